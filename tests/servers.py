"""The servers tests run, and the one place that starts them.

- ``Postgres``: the session's embedded PostgreSQL, a fresh database per caller;
- ``GeminiServer``: geminikv in this process, on an event loop of its own in a thread, for
  most tests and for white-box checks (``app``, ``call``);
- ``GeminiProcess``: ``python -m geminikv`` in a process of its own, for kills, signals,
  resource use and load; ``Etcd``: the real etcd, the reference (both ``ServerProcess``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, Self, TypeVar, cast

import asyncpg
import grpc

from geminikv.config import Settings
from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.proto.etcdserverpb import rpc_pb2_grpc
from geminikv.server.app import App
from geminikv.storage.embedded import EmbeddedPostgres
from tests.waiting import eventually

T = TypeVar("T")


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even inside a running loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def range_once_rebuilt(
    kv: rpc_pb2_grpc.KVStub, request: pb.RangeRequest, reason: str, timeout: float = 15.0
) -> pb.RangeResponse:
    """``kv.Range(request)`` once the server has rebuilt its index; meanwhile every call
    must fail with Unavailable saying ``reason``."""

    def answered() -> pb.RangeResponse | None:
        try:
            return cast(pb.RangeResponse, kv.Range(request))  # the stub is untyped
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert reason in (err.details() or "")
            return None

    response = eventually(answered, f"the index rebuilt after: {reason}", timeout, 0.1)
    assert response is not None
    return response


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_postgres(data: Path) -> str:
    """Start an embedded PostgreSQL on ``data`` from a helper process and return its DSN.

    From a separate process: forking a process that runs gRPC (this one) can crash the
    child in gRPC's fork handlers. The server outlives the helper."""
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from geminikv.storage.embedded import EmbeddedPostgres as E; "
            "E(sys.argv[1]).start()",
            str(data),
        ],
        check=True,
        timeout=120,
    )
    return EmbeddedPostgres(data).dsn()


def postgres_pid(data: Path) -> int | None:
    pidfile = data / "pgdata" / "postmaster.pid"
    try:
        return int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def stop_postgres(data: Path, sig: int = signal.SIGINT, timeout: float = 60.0) -> None:
    """Stop the server on ``data``: SIGINT = fast shutdown (commits kept, clients cut off),
    SIGQUIT = immediate shutdown (crash recovery at the next start); wait until it is down."""
    pid = postgres_pid(data)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    eventually(lambda: not alive(pid), f"PostgreSQL {pid} stopped", timeout)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Postgres:
    """The session's embedded PostgreSQL; every caller can get a database of its own."""

    def __init__(self, root: Path) -> None:
        self.server = EmbeddedPostgres(root)
        self.server.start()

    def admin_dsn(self) -> str:
        return self.server.dsn("postgres")

    def new_database(self, prefix: str = "t") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"

        async def create() -> None:
            conn = await asyncpg.connect(self.admin_dsn())
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()

        run_sync(create())
        return self.server.dsn(name)

    def stop(self) -> None:
        self.server.stop()


class Stubs:
    """Synchronous etcd v3 stubs on one channel."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.channel = grpc.insecure_channel(target)
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.kv = rpc_pb2_grpc.KVStub(self.channel)
        self.watch = rpc_pb2_grpc.WatchStub(self.channel)
        self.lease = rpc_pb2_grpc.LeaseStub(self.channel)
        self.maintenance = rpc_pb2_grpc.MaintenanceStub(self.channel)
        self.cluster = rpc_pb2_grpc.ClusterStub(self.channel)

    def close(self) -> None:
        self.channel.close()


class GeminiServer:
    """A geminikv App running on its own event loop in a background thread."""

    def __init__(self, dsn: str, **overrides: Any) -> None:
        """``overrides``: Settings fields (``poll_interval=60.0``, ...)."""
        self.port = free_port()
        base: dict[str, Any] = {
            "endpoint": dsn,
            "listen_address": f"127.0.0.1:{self.port}",
            "metrics_bind_address": "0",
            "poll_interval": 0.2,
        }
        self.settings = replace(Settings(), **{**base, **overrides})
        self.endpoint = f"127.0.0.1:{self.port}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.app: App | None = None

    def start(self) -> GeminiServer:
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self.app = App(self.settings)
            try:
                loop.run_until_complete(self.app.start())
            except BaseException as err:  # reported to the starting thread
                failure.append(err)
                started.set()
                loop.run_until_complete(self.app.stop())
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self.app.stop())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"geminikv-{self.port}", daemon=True)
        self._thread.start()
        started.wait(120)
        if failure:
            raise failure[0]
        return self

    def call(self, coro_factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run a coroutine on the server's loop (for white-box checks)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro_factory(), self._loop).result(60)

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(60)
        self._loop = None
        self._thread = None

    def stubs(self) -> Stubs:
        return Stubs(self.endpoint)


class ServerProcess:
    """A server in a process of its own, its output in a log file; ``start`` returns once
    it accepts connections."""

    name = "server"
    start_timeout = 60.0

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log = tempfile.NamedTemporaryFile(prefix=f"{self.name}-", suffix=".log", delete=False)  # noqa: SIM115

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float | None = None) -> Self:
        self.spawn()
        eventually(
            self._listening,
            lambda: f"{self.name} listening on {self.endpoint}: {self.output()}",
            timeout or self.start_timeout,
            0.1,
        )
        return self

    def spawn(self) -> Self:
        """Start it without waiting for it to listen (a unix socket, or a start that fails)."""
        self.process = subprocess.Popen(self.argv(), stdout=self.log, stderr=subprocess.STDOUT)
        return self

    def exit_code(self, timeout: float = 60.0) -> int:
        """Run a server that is expected to give up by itself."""
        process = self.spawn().process
        assert process is not None
        return process.wait(timeout)

    def _listening(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited: {self.output()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def output(self) -> str:
        with open(self.log.name, "rb") as f:
            return f.read().decode(errors="replace")

    def stubs(self) -> Stubs:
        return Stubs(self.endpoint)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        """SIGTERM (a clean shutdown), then SIGKILL if it takes longer than 30 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()


class GeminiProcess(ServerProcess):
    """geminikv as a separate process (``python -m geminikv``), for kills, signals, its
    resource use, and load that must not share the test's interpreter."""

    name = "geminikv"

    def __init__(self, dsn: str, *args: str, port: int | None = None) -> None:
        super().__init__(port)
        self.dsn = dsn
        self.args = args

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "geminikv",
            "--endpoint",
            self.dsn,
            "--listen-address",
            self.endpoint,
            "--metrics-bind-address",
            "0",
            *self.args,
        ]


class Etcd(ServerProcess):
    """A real etcd (Debian etcd-server), the reference, with its data in a temporary
    directory."""

    name = "etcd"
    start_timeout = 120.0

    def __init__(self) -> None:
        if shutil.which("etcd") is None:
            raise FileNotFoundError("etcd")
        super().__init__()
        self.peer_port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="geminikv-etcd-"))

    def argv(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [
            "etcd",
            "--data-dir",
            str(self.workdir / "data"),
            "--listen-client-urls",
            f"http://{self.endpoint}",
            "--advertise-client-urls",
            f"http://{self.endpoint}",
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"default={peer}",
            "--quota-backend-bytes",
            str(8 * 1024**3),
        ]

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
        Path(self.log.name).unlink(missing_ok=True)
