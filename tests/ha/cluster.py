"""The HA harness's set-ups as context managers: whatever happens inside (a failed
assertion, a frozen node), leaving them kills every process, deletes the namespaces and
the bridge and removes the temporary directory."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.ha import replication
from tests.ha.autofailover import Formation
from tests.ha.net import PREFIX, Network, clean_stale, session_lock
from tests.ha.node import PG_BIN, Node

# Fixed ports: every node has a namespace of its own, distinct ports only keep the nodes'
# Unix sockets and logs apart.
MONITOR_PORT = 25431
NODE_PORTS = (25432, 25433)


def missing() -> str | None:
    """Why the HA harness cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    if shutil.which("ip") is None:
        return "needs iproute2 (Debian iproute2)"
    if not (PG_BIN / "postgres").exists():
        return "needs PostgreSQL 15 (Debian postgresql-15)"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "needs the postgres OS user (Debian postgresql-15)"
    return None


@contextlib.contextmanager
def harness() -> Iterator[tuple[Network, Path]]:
    """The bridge and a temporary root; cleaned whatever happens, stale ones first."""
    with session_lock():
        clean_stale()
        root = Path(tempfile.mkdtemp(prefix=PREFIX))
        root.chmod(0o755)  # the postgres user walks into its nodes' directories
        network = Network()
        try:
            yield network, root
        finally:
            network.close()
            shutil.rmtree(root, ignore_errors=True)


@dataclass
class Pair:
    """Two nodes; ``primary`` and ``standby`` follow the failovers the test makes."""

    network: Network
    nodes: tuple[Node, Node]
    primary: Node
    standby: Node

    def swap(self) -> None:
        self.primary, self.standby = self.standby, self.primary

    def endpoint(self, database: str = "kubernetes") -> str:
        return endpoint(self.nodes, database)


def endpoint(nodes: tuple[Node, ...], database: str = "kubernetes") -> str:
    """geminikv's --endpoint: every host, libpq's multi-host form."""
    hosts = ",".join(f"{n.address}:{n.port}" for n in nodes)
    return f"postgres://postgres@{hosts}/{database}?target_session_attrs=read-write"


@contextlib.contextmanager
def plain_pair() -> Iterator[Pair]:
    """n1 primary, n2 its synchronous standby; no failover manager."""
    with harness() as (network, root):
        n1 = Node(network, "n1", 11, NODE_PORTS[0], root)
        n2 = Node(network, "n2", 12, NODE_PORTS[1], root)
        replication.init_primary(n1)
        replication.init_standby(n2, n1)
        yield Pair(network, (n1, n2), n1, n2)


@contextlib.contextmanager
def formation() -> Iterator[Formation]:
    """pg_auto_failover: the monitor in namespace gkha-mon, n1 primary, n2 secondary."""
    with harness() as (network, root):
        monitor = Node(network, "mon", 2, MONITOR_PORT, root)
        n1 = Node(network, "n1", 11, NODE_PORTS[0], root)
        n2 = Node(network, "n2", 12, NODE_PORTS[1], root)
        yield Formation(network, monitor, (n1, n2)).start()
