"""Network namespaces joined by a bridge: each "node" of an HA test is one namespace.

Layout (addresses only these test hosts use; traffic stays on the bridge and loopback):

    root namespace: bridge gkha-br 10.231.0.1/24
    namespace gkha-<name>: eth0 10.231.0.<n>/24, veth peer gkha-<name> on the bridge

Everything the harness creates is named with the prefix ``gkha-`` (namespaces, links,
temporary directories), so a session that died mid-test leaves nothing a later run cannot
find and remove (``clean_stale``). A lock file serialises sessions on one machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

PREFIX = "gkha-"
BRIDGE = PREFIX + "br"
SUBNET = "10.231.0"
BRIDGE_ADDRESS = SUBNET + ".1"
LOCK = Path(tempfile.gettempdir()) / (PREFIX + "lock")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


def namespace_pids(namespace: str) -> list[int]:
    """Every process whose network namespace is ``namespace``."""
    out = ip("netns", "pids", namespace, check=False).stdout
    return [int(pid) for pid in out.split()]


def signal_namespace(namespace: str, sig: int) -> list[int]:
    pids = namespace_pids(namespace)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return pids


def kill_namespace(namespace: str, timeout: float = 10.0) -> tuple[float, set[int]]:
    """SIGKILL every process in ``namespace`` until none is left (children forked meanwhile
    included); returns the monotonic time just after the first signals, and the pids."""
    killed: set[int] = set(signal_namespace(namespace, signal.SIGKILL))
    killed_at = time.monotonic()  # after the signals: listing the pids takes a while
    deadline = killed_at + timeout
    while pids := signal_namespace(namespace, signal.SIGKILL):
        killed.update(pids)
        if time.monotonic() > deadline:
            raise TimeoutError(f"processes left in {namespace}: {namespace_pids(namespace)}")
        time.sleep(0.05)
    return killed_at, killed


def wait_reaped(pids: set[int], timeout: float = 30.0) -> None:
    """Until the dead are reaped (by us or by init, which can take a second or more):
    PostgreSQL refuses a data directory whose postmaster.pid names a process that still
    exists, even as a zombie."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while exists(pid):
            if time.monotonic() > deadline:
                raise TimeoutError(f"process {pid} not reaped")
            time.sleep(0.02)


def exists(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):  # one of ours (a keeper): reap it here
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def clean_stale() -> None:
    """Remove what an earlier session left: namespaces (and their processes), links and
    temporary directories with the harness's prefix."""
    for line in ip("netns", "list").stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(PREFIX):
            kill_namespace(name)
            ip("netns", "delete", name, check=False)
    for line in ip("-o", "link", "show").stdout.splitlines():
        link = line.split(":")[1].strip().split("@")[0]
        if link.startswith(PREFIX):
            ip("link", "delete", link, check=False)
    for path in Path(tempfile.gettempdir()).glob(PREFIX + "*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def session_lock() -> Iterator[None]:
    """One HA harness at a time on this machine (they share names and addresses)."""
    with open(LOCK, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Network:
    """The bridge, and one namespace per node added with ``add``."""

    def __init__(self) -> None:
        self.namespaces: list[str] = []
        ip("link", "add", BRIDGE, "type", "bridge")
        ip("addr", "add", BRIDGE_ADDRESS + "/24", "dev", BRIDGE)
        ip("link", "set", BRIDGE, "up")

    def add(self, name: str, host: int) -> tuple[str, str]:
        """A namespace ``gkha-<name>`` at 10.231.0.<host>; returns (namespace, address)."""
        namespace = PREFIX + name
        address = f"{SUBNET}.{host}"
        ip("netns", "add", namespace)
        self.namespaces.append(namespace)
        ip("link", "add", namespace, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        ip("link", "set", namespace, "master", BRIDGE)
        ip("link", "set", namespace, "up")
        ip("-n", namespace, "addr", "add", address + "/24", "dev", "eth0")
        ip("-n", namespace, "link", "set", "eth0", "up")
        ip("-n", namespace, "link", "set", "lo", "up")
        return namespace, address

    def cut(self, namespace: str) -> None:
        """The node's cable pulled: its veth down, no packet in or out, no FIN or RST."""
        ip("link", "set", namespace, "down")

    def mend(self, namespace: str) -> None:
        ip("link", "set", namespace, "up")

    def close(self) -> None:
        for namespace in self.namespaces:
            with contextlib.suppress(TimeoutError):
                kill_namespace(namespace)
            ip("netns", "delete", namespace, check=False)
            ip("link", "delete", namespace, check=False)
        self.namespaces.clear()
        ip("link", "delete", BRIDGE, check=False)
