"""What the harness measures: servers it starts (geminikv, etcd, null) or endpoints."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import psutil

# This package's import name: geminikv_bench when installed, benchmarks in a checkout.
HARNESS = __name__.rpartition(".")[0]
LOG_TAIL_LINES = 30  # of a server's log, shown when it fails to start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def terminate(process: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM (a clean shutdown), then SIGKILL if it takes longer than 30 s."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def interpreter(python: str) -> str:
    """Which Python ``python`` is: its version and the real path of its executable (two
    builds of one version can differ by a tenth in throughput: README, Performance)."""
    done = subprocess.run(
        [
            python,
            "-c",
            "import os, platform, sys; "
            "print(platform.python_version(), os.path.realpath(sys.executable))",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout.strip()


def wait_listening(port: int, process: subprocess.Popen[bytes] | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on port {port} after {timeout:.0f}s")


@dataclass
class Target:
    name: str
    endpoint: str = ""
    process: subprocess.Popen[bytes] | None = None
    workdir: str | None = None
    cpu_list: str | None = None  # taskset CPU list for the server

    def start(self) -> Target:
        return self

    def python(self) -> str | None:
        """The interpreter a Python server runs on (None: not a Python server)."""
        return None

    def log(self) -> str:
        """What the server printed (kept until ``stop``)."""
        try:
            with open(os.path.join(self.workdir or tempfile.gettempdir(), f"{self.name}.log")) as f:
                return f.read()
        except OSError:
            return ""

    def stop(self) -> None:
        terminate(self.process)
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def processes(self) -> list[psutil.Process]:
        """The server's processes (with PostgreSQL's, when it runs under geminikv)."""
        if self.process is None:
            return []
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _spawn(
        self, argv: list[str], port: int, timeout: float = 120.0, cwd: str | None = None
    ) -> None:
        if self.cpu_list and shutil.which("taskset"):
            argv = ["taskset", "-c", self.cpu_list, *argv]
        log = open(os.path.join(self.workdir or tempfile.gettempdir(), f"{self.name}.log"), "wb")  # noqa: SIM115
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
        self.endpoint = f"127.0.0.1:{port}"
        try:
            wait_listening(port, self.process, timeout)
        except (RuntimeError, TimeoutError) as err:
            # The log goes with the working directory on stop: show its end now.
            tail = "\n".join(self.log().splitlines()[-LOG_TAIL_LINES:])
            raise RuntimeError(f"{self.name} did not start: {err}; its log ends:\n{tail}") from None


class GeminiTarget(Target):
    """geminikv as installed for ``python`` (this interpreter's by default; another
    checkout's venv for an A/B of two versions in one run, under another ``name``)."""

    def __init__(
        self,
        dsn: str = "",
        extra: list[str] | None = None,
        *,
        name: str = "geminikv",
        python: str = sys.executable,
        **kw: object,
    ) -> None:
        super().__init__(name, **kw)  # type: ignore[arg-type]
        self.dsn = dsn
        self.extra = extra or []
        self.executable = python

    def python(self) -> str | None:
        return self.executable

    def start(self) -> Target:
        self.workdir = tempfile.mkdtemp(prefix="bench-geminikv-")
        port = free_port()
        argv = [
            self.executable,
            "-m",
            "geminikv",
            "--listen-address",
            f"127.0.0.1:{port}",
            "--metrics-bind-address",
            "0",
            *self.extra,
        ]
        argv += ["--endpoint", self.dsn] if self.dsn else ["--data-dir", self.workdir]
        # From its own directory: `-m geminikv` must find the installed server, not a
        # geminikv source tree that happens to be in the user's working directory.
        self._spawn(argv, port, cwd=self.workdir)
        return self


class EtcdTarget(Target):
    def __init__(self, **kw: object) -> None:
        super().__init__("etcd", **kw)  # type: ignore[arg-type]

    @staticmethod
    def available() -> bool:
        return shutil.which("etcd") is not None

    def start(self) -> Target:
        self.workdir = tempfile.mkdtemp(prefix="bench-etcd-")
        port, peer = free_port(), free_port()
        self._spawn(
            [
                "etcd",
                "--data-dir",
                os.path.join(self.workdir, "data"),
                "--listen-client-urls",
                f"http://127.0.0.1:{port}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{port}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{peer}",
                "--initial-cluster",
                f"default=http://127.0.0.1:{peer}",
                "--quota-backend-bytes",
                str(8 * 1024**3),
            ],
            port,
        )
        return self


class NullTarget(Target):
    def __init__(self, **kw: object) -> None:
        super().__init__("null", **kw)  # type: ignore[arg-type]

    def python(self) -> str | None:
        return sys.executable

    def start(self) -> Target:
        self.workdir = tempfile.mkdtemp(prefix="bench-null-")
        port = free_port()
        server = f"{HARNESS}.null_server"
        self._spawn([sys.executable, "-m", server, f"127.0.0.1:{port}"], port)
        return self


class ExternalTarget(Target):
    """Any etcd v3 endpoint given as ``--target NAME=host:port`` (e.g. Go Kine)."""

    def __init__(self, name: str, endpoint: str) -> None:
        super().__init__(name, endpoint=endpoint)
