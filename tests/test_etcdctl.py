"""End to end with etcdctl (Debian etcd-client), compared with a real etcd where possible."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
from typing import IO

import pytest

from tests.servers import Etcd, GeminiServer, Postgres
from tests.waiting import eventually

pytestmark = [
    pytest.mark.etcdctl,
    pytest.mark.skipif(
        shutil.which("etcdctl") is None, reason="etcdctl not installed (etcd-client)"
    ),
]


def ctl(endpoint: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, ETCDCTL_API="3")
    return subprocess.run(
        ["etcdctl", "--endpoints", endpoint, "--command-timeout=20s", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def both(etcd: Etcd, gemini: GeminiServer, *args: str, stdin: str | None = None) -> str:
    """Run one etcdctl command against both servers; outputs and exit codes must match."""
    e = ctl(etcd.endpoint, *args, stdin=stdin)
    g = ctl(gemini.endpoint, *args, stdin=stdin)
    assert (g.returncode, g.stdout) == (e.returncode, e.stdout), (
        f"etcdctl {' '.join(args)}\n etcd: {e.returncode} {e.stdout!r} {e.stderr!r}\n"
        f" geminikv: {g.returncode} {g.stdout!r} {g.stderr!r}"
    )
    if e.returncode != 0:
        assert _error_line(g.stderr) == _error_line(e.stderr)
    return e.stdout


def _error_line(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.startswith("Error:")][-1]


@pytest.mark.etcd
def test_put_get_del(etcd: Etcd, gemini: GeminiServer, prefix: bytes) -> None:
    p = prefix.decode()
    for i, name in enumerate(["a", "b", "c", "d"]):
        assert both(etcd, gemini, "put", p + name, f"v{i}") == "OK\n"
    both(etcd, gemini, "put", p + "b", "v-b2", "--prev-kv")
    both(etcd, gemini, "put", p + "b", "--ignore-value")
    both(etcd, gemini, "put", p + "zz", "--ignore-value")
    both(etcd, gemini, "get", p + "a")
    both(etcd, gemini, "get", p, "--prefix")
    both(etcd, gemini, "get", p, "--prefix", "--limit", "2")
    both(etcd, gemini, "get", p, "--prefix", "--keys-only")
    both(etcd, gemini, "get", p, "--prefix", "--print-value-only")
    both(etcd, gemini, "get", p + "b", p + "d")
    both(etcd, gemini, "get", p + "b", "--from-key")
    for sort in ("CREATE", "KEY", "MODIFY", "VALUE", "VERSION"):
        both(etcd, gemini, "get", p, "--prefix", "--sort-by", sort, "--order", "DESCEND")
    assert both(etcd, gemini, "get", p, "--prefix", "--keys-only").count("\n") == 8
    both(etcd, gemini, "del", p + "a", "--prev-kv")
    both(etcd, gemini, "del", p + "b", "--prefix")
    both(etcd, gemini, "del", p + "c", "--from-key")
    both(etcd, gemini, "get", p, "--prefix")
    both(etcd, gemini, "get", "")


@pytest.mark.etcd
def test_txn(etcd: Etcd, gemini: GeminiServer, prefix: bytes) -> None:
    p = prefix.decode()
    both(etcd, gemini, "put", p + "k", "v1")
    script = f'value("{p}k") = "v1"\n\nput {p}k v2\nget {p}k\n\nget {p}k\n\n'
    assert both(etcd, gemini, "txn", stdin=script).startswith("SUCCESS")
    assert both(etcd, gemini, "txn", stdin=script).startswith("FAILURE")
    script = f'version("{p}k") = "2"\ncreate("{p}missing") = "0"\n\ndel {p}k\n\n\n'
    both(etcd, gemini, "txn", stdin=script)
    both(etcd, gemini, "get", p, "--prefix")


def test_rev_and_compaction(gemini: GeminiServer, prefix: bytes) -> None:
    p = prefix.decode()
    assert ctl(gemini.endpoint, "put", p + "k", "one").returncode == 0
    first = json.loads(ctl(gemini.endpoint, "get", p + "k", "-w", "json").stdout)
    rev = first["kvs"][0]["mod_revision"]
    assert ctl(gemini.endpoint, "put", p + "k", "two").returncode == 0
    old = ctl(gemini.endpoint, "get", p + "k", f"--rev={rev}", "--print-value-only")
    assert old.stdout == "one\n"
    current = json.loads(ctl(gemini.endpoint, "get", p + "k", "-w", "json").stdout)
    head = current["header"]["revision"]
    done = ctl(gemini.endpoint, "compaction", str(head))
    assert done.returncode == 0 and done.stdout == f"compacted revision {head}\n"
    gone = ctl(gemini.endpoint, "get", p + "k", f"--rev={rev}")
    assert gone.returncode != 0
    assert "required revision has been compacted" in gone.stderr
    again = ctl(gemini.endpoint, "compaction", str(head))
    assert "required revision has been compacted" in again.stderr
    future = ctl(gemini.endpoint, "compaction", str(head + 1000))
    assert "required revision is a future revision" in future.stderr
    assert ctl(gemini.endpoint, "get", p + "k", "--print-value-only").stdout == "two\n"


def test_endpoint_status_health_members(gemini: GeminiServer) -> None:
    status = json.loads(ctl(gemini.endpoint, "endpoint", "status", "-w", "json").stdout)[0]
    assert status["Status"]["version"] == "3.5.16"
    assert status["Status"]["leader"] == status["Status"]["header"]["member_id"]
    assert status["Status"]["dbSize"] > 0
    health = ctl(gemini.endpoint, "endpoint", "health")
    assert health.returncode == 0 and "is healthy" in health.stdout + health.stderr
    members = json.loads(ctl(gemini.endpoint, "member", "list", "-w", "json").stdout)
    assert len(members["members"]) == 1
    assert members["members"][0]["clientURLs"] == [f"http://{gemini.endpoint}"]
    cluster = ctl(gemini.endpoint, "endpoint", "health", "--cluster")
    assert cluster.returncode == 0, cluster.stderr


class _Watch:
    """``etcdctl watch`` running, its output read as it comes."""

    def __init__(self, endpoint: str, *args: str) -> None:
        env = dict(os.environ, ETCDCTL_API="3")
        self.process = subprocess.Popen(
            ["etcdctl", "--endpoints", endpoint, "watch", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self.errors: list[str] = []
        self._readers = [
            threading.Thread(target=_read, args=(stream, into), daemon=True)
            for stream, into in (
                (self.process.stdout, self.lines),
                (self.process.stderr, self.errors),
            )
        ]
        for reader in self._readers:
            reader.start()

    def events(self) -> int:
        return sum(line in ("PUT", "DELETE") for line in self.lines)

    def stop(self) -> tuple[str, str]:
        """Its whole output: stdout, stderr."""
        self.process.terminate()
        self.process.wait(10)
        for reader in self._readers:
            reader.join(10)
        return "".join(line + "\n" for line in self.lines), "".join(self.errors)


def _watched(endpoint: str, rev: int, events: int) -> str:
    """What ``etcdctl watch /cc/k --rev=rev`` prints: ``events`` events, or (none
    expected) until it exits."""
    watcher = _Watch(endpoint, "/cc/k", f"--rev={rev}")
    if events:
        eventually(lambda: len(watcher.lines) == 3 * events, f"{events} events printed")
    else:
        eventually(lambda: watcher.process.poll() is not None, "etcdctl exited")
    stdout, stderr = watcher.stop()
    return stdout + stderr


def _read(stream: IO[str] | None, into: list[str]) -> None:
    assert stream is not None
    for line in stream:
        into.append(line.rstrip("\n"))


@pytest.mark.etcd
def test_watch(etcd: Etcd, gemini: GeminiServer, prefix: bytes) -> None:
    p = prefix.decode()
    both(etcd, gemini, "put", p + "a", "1")
    both(etcd, gemini, "put", p + "a", "2")
    revs = {
        name: json.loads(ctl(server.endpoint, "get", p + "a", "-w", "json").stdout)["kvs"][0]
        for name, server in (("etcd", etcd), ("gk", gemini))
    }
    watchers = {}
    for name, server in (("etcd", etcd), ("gk", gemini)):
        # from the next revision: a watcher that starts after the puts misses nothing
        first, after = revs[name]["create_revision"], revs[name]["mod_revision"] + 1
        watchers[name] = [
            _Watch(server.endpoint, p, "--prefix", "--prev-kv", f"--rev={after}"),
            _Watch(server.endpoint, p + "a", f"--rev={first}"),
            _Watch(server.endpoint, p + "b", p + "z", f"--rev={after}"),
        ]
    both(etcd, gemini, "put", p + "b", "x")
    both(etcd, gemini, "del", p + "a")
    both(etcd, gemini, "put", p + "a", "3")
    expected = [3, 4, 1]  # events: put b, del a, put a; and the two puts of a before

    def printed() -> bool:
        pairs = zip(watchers["etcd"], watchers["gk"], expected, strict=True)
        return all(
            e.events() == g.events() == n and len(e.lines) == len(g.lines) for e, g, n in pairs
        )

    eventually(printed, "every watcher printed its events")
    outputs = {name: [w.stop()[0] for w in procs] for name, procs in watchers.items()}
    assert outputs["gk"] == outputs["etcd"]
    assert outputs["gk"][0].count("PUT") == 2 and "DELETE" in outputs["gk"][0]


@pytest.mark.etcd
def test_lease_commands(etcd: Etcd, gemini: GeminiServer, prefix: bytes) -> None:
    p = prefix.decode()
    outputs = {}
    for name, server in (("etcd", etcd), ("gk", gemini)):
        granted = ctl(server.endpoint, "lease", "grant", "60").stdout  # lease <hex> granted…
        lease = granted.split()[1]
        steps = [
            granted,
            ctl(server.endpoint, "put", "--lease=" + lease, p + "a", "1").stdout,
            ctl(server.endpoint, "put", "--lease=" + lease, p + "b", "2").stdout,
            ctl(server.endpoint, "put", p + "b", "3").stdout,  # detaches
            ctl(server.endpoint, "lease", "timetolive", lease, "--keys").stdout,
            ctl(server.endpoint, "lease", "keep-alive", "--once", lease).stdout,
            str(lease in ctl(server.endpoint, "lease", "list").stdout),
            ctl(server.endpoint, "lease", "revoke", lease).stdout,
            ctl(server.endpoint, "get", p, "--prefix").stdout,
            ctl(server.endpoint, "lease", "timetolive", lease).stdout,
            ctl(server.endpoint, "put", "--lease=" + lease, p + "c", "4").stderr.splitlines()[-1],
            ctl(server.endpoint, "lease", "revoke", lease).stderr.splitlines()[-1],
        ]
        # lease ids are the server's choice; remaining seconds may differ by one
        outputs[name] = [
            re.sub(r"remaining\(\d+s\)", "remaining(Ns)", step.replace(lease, "ID"))
            for step in steps
        ]
    assert outputs["gk"] == outputs["etcd"]
    assert "attached keys([" + p + "a])" in outputs["gk"][4]


@pytest.mark.etcd
def test_compaction_commands(postgres: Postgres) -> None:
    etcd = Etcd().start()
    gemini = GeminiServer(postgres.new_database("ctlcompact")).start()
    try:
        for i in range(6):
            both(etcd, gemini, "put", "/cc/k", str(i))
        revs = {}
        for name, server in (("etcd", etcd), ("gk", gemini)):
            kv = json.loads(ctl(server.endpoint, "get", "/cc/k", "-w", "json").stdout)["kvs"][0]
            revs[name] = (kv["create_revision"], kv["mod_revision"])
        outputs: dict[str, list[str]] = {"etcd": [], "gk": []}
        for name, server in (("etcd", etcd), ("gk", gemini)):
            first, last = revs[name]
            target = first + 3
            out = outputs[name]
            out.append(
                ctl(server.endpoint, "compaction", "--physical", str(target)).stdout.replace(
                    str(target), "R"
                )
            )
            for rev in (target - 1, target, target + 1, last):
                done = ctl(server.endpoint, "get", "/cc/k", f"--rev={rev}", "--print-value-only")
                out.append(done.stdout + (_error_line(done.stderr) if done.returncode else ""))
            done = ctl(server.endpoint, "compaction", str(target))
            out.append(_error_line(done.stderr))
            # from a compacted revision: cancelled, and etcdctl exits
            out.append(_watched(server.endpoint, target - 1, 0).replace(str(target), "R"))
            # from the compaction's: its events, three lines each (type, key, value)
            out.append(
                _watched(server.endpoint, target, last - target + 1).replace(str(target), "R")
            )
        assert outputs["gk"] == outputs["etcd"]
    finally:
        gemini.stop()
        etcd.stop()
