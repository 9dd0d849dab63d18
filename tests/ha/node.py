"""One node of an HA test: a network namespace, an address, a PostgreSQL 15 data directory
owned by the ``postgres`` OS user, and the faults a real machine meets."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import pwd
import signal
import subprocess
import time
from pathlib import Path

import asyncpg

from tests.ha.net import Network, kill_namespace, namespace_pids, signal_namespace, wait_reaped

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def run_sync(coro):  # type: ignore[no-untyped-def]
    """Run a coroutine to completion from sync code, even inside a running loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def postgres_user() -> tuple[int, int]:
    entry = pwd.getpwnam("postgres")
    return entry.pw_uid, entry.pw_gid


def give_to_postgres(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    uid, gid = postgres_user()
    os.chown(path, uid, gid)
    return path


class Node:
    """``name`` in namespace ``namespace`` at ``address``; PostgreSQL listens on ``port``."""

    def __init__(self, network: Network, name: str, host: int, port: int, root: Path) -> None:
        self.network = network
        self.name = name
        self.namespace, self.address = network.add(name, host)
        self.port = port
        self.home = give_to_postgres(root / name)
        self.data = self.home / "data"
        self.log = self.home / "postgres.log"
        self.processes: list[subprocess.Popen[bytes]] = []
        # where PostgreSQL's Unix socket is: the node's own directory (plain replication
        # sets it), or the compiled-in default pg_auto_failover keeps (ports keep them apart)
        self.socket_dir = self.home
        self.dead: set[int] = set()  # killed, maybe not yet reaped

    # -- running things inside the node ---------------------------------------------------

    def env(self) -> dict[str, str]:
        """The postgres user's environment: pg_autoctl keeps its files under XDG dirs."""
        return {
            "PATH": f"{PG_BIN}:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": str(self.home),
            "XDG_CONFIG_HOME": str(self.home / "config"),
            "XDG_DATA_HOME": str(self.home / "share"),
            "XDG_RUNTIME_DIR": str(self.home / "run"),
            "PGHOST": str(self.socket_dir),
            "PGPORT": str(self.port),
            "PGUSER": "postgres",
            "LANG": "C.UTF-8",
        }

    def command(self, *args: str, as_postgres: bool = True) -> list[str]:
        prefix = ["ip", "netns", "exec", self.namespace]
        if as_postgres:
            prefix += ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]
        return [*prefix, *args]

    def run(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.command(*args), env=self.env(), capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{self.name}: {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def spawn(
        self, *args: str, log: Path, as_postgres: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """A long-running process in the node (killed with the node)."""
        with open(log, "ab") as out:
            process = subprocess.Popen(
                self.command(*args, as_postgres=as_postgres),
                env={**self.env(), **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append(process)
        return process

    def pids(self) -> list[int]:
        return namespace_pids(self.namespace)

    # -- faults ---------------------------------------------------------------------------

    def kill(self) -> float:
        """kill -9 of every process of the node (PostgreSQL, its manager, geminikv...);
        returns the monotonic time of the kill."""
        killed_at, self.dead = kill_namespace(self.namespace)
        return killed_at

    def wait_reaped(self) -> None:
        """Before starting anything on a killed node's data directory again."""
        self.reap()
        wait_reaped(self.dead)
        self.dead = set()

    def freeze(self) -> None:
        """SIGSTOP every process of the node: connections stay open and nothing answers."""
        signal_namespace(self.namespace, signal.SIGSTOP)

    def thaw(self) -> None:
        signal_namespace(self.namespace, signal.SIGCONT)

    def cut(self) -> None:
        self.network.cut(self.namespace)

    def mend(self) -> None:
        self.network.mend(self.namespace)

    def reap(self) -> None:
        """Forget (and reap) the processes we spawned that have died."""
        self.processes = [process for process in self.processes if process.poll() is None]

    # -- PostgreSQL -----------------------------------------------------------------------

    def pg_ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), *args, timeout=timeout)

    def dsn(self, database: str = "postgres") -> str:
        return f"postgres://postgres@{self.address}:{self.port}/{database}"

    def sql(
        self, query: str, *args: object, database: str = "postgres", timeout: float = 10
    ) -> object:
        """One value from ``query`` over TCP from the root namespace."""

        async def fetch() -> object:
            conn = await asyncpg.connect(self.dsn(database), timeout=timeout)
            try:
                return await conn.fetchval(query, *args, timeout=timeout)
            finally:
                await conn.close()

        return run_sync(fetch())

    def in_recovery(self) -> bool:
        return bool(self.sql("SELECT pg_is_in_recovery()"))

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sql("SELECT 1", timeout=2)
                return
            except (OSError, asyncpg.PostgresError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
