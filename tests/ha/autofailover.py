"""pg_auto_failover (Debian's postgresql-15-auto-failover and pg-auto-failover-cli): a
monitor in a namespace of its own (the witness) and a keeper with its PostgreSQL on each of
two data nodes, tuned to fail over in seconds.

With two data nodes the monitor keeps synchronous replication on while the secondary is
healthy (``synchronous_standby_names = 'ANY 1 (pgautofailover_standby_N)'``) and turns it
off when it promotes the secondary alone (state ``wait_primary``)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.ha.net import SUBNET, Network
from tests.ha.node import PG_BIN, Node

# The monitor decides: a check every second, a node unhealthy after one failed retry and
# 2 s without a report; the secondary promoted when the primary has had 3 s to demote.
MONITOR_SETTINGS = {
    "pgautofailover.health_check_period": "1000",
    "pgautofailover.health_check_timeout": "1000",
    "pgautofailover.health_check_max_retries": "1",
    "pgautofailover.health_check_retry_delay": "200",
    "pgautofailover.node_considered_unhealthy_timeout": "2000",
    "pgautofailover.primary_demote_timeout": "3000",
    "pgautofailover.startup_grace_period": "1000",
}
# A primary that reaches neither the monitor nor its standby for 2 s stops accepting
# writes (less than primary_demote_timeout: never two writable primaries).
KEEPER_SETTINGS = {
    "timeout.network_partition_timeout": "2",
    "timeout.prepare_promotion_catchup": "5",
    "timeout.prepare_promotion_walreceiver": "1",
}
# pg_auto_failover keeps Debian's compiled-in socket directory; the ports keep nodes apart.
SOCKET_DIR = Path("/var/run/postgresql")
HBA = f"host all all {SUBNET}.0/24 trust\n"


def keeper_command(node: Node, *args: str) -> list[str]:
    return ["pg_autoctl", *args, "--pgdata", str(node.data)]


def registered(name: str) -> Callable[[dict[str, tuple[str, str]]], bool]:
    return lambda states: name in states


class Formation:
    """The monitor and the data nodes; ``start`` brings up n1 primary, n2 secondary."""

    def __init__(self, network: Network, monitor: Node, nodes: tuple[Node, Node]) -> None:
        self.network = network
        self.monitor = monitor
        self.nodes = nodes
        for node in (monitor, *nodes):
            node.socket_dir = SOCKET_DIR
        self.monitor_uri = ""

    def start(self) -> Formation:
        mon = self.monitor
        mon.run(
            "pg_autoctl", "create", "monitor",
            "--pgdata", str(mon.data), "--pgport", str(mon.port), "--hostname", mon.address,
            "--auth", "trust", "--no-ssl", "--pgctl", str(PG_BIN / "pg_ctl"),
        )  # fmt: skip
        for name, value in MONITOR_SETTINGS.items():
            with open(mon.data / "postgresql.auto.conf", "a") as f:
                f.write(f"{name} = '{value}'\n")
        self.run_keeper(mon)
        self.monitor_uri = self._monitor_uri()
        for node in self.nodes:
            self.create_node(node)
            self.run_keeper(node)
            self.wait(registered(node.name), f"{node.name} registered")
        self.wait_settled()
        return self

    def _monitor_uri(self) -> str:
        deadline = time.monotonic() + 60
        while True:
            result = self.monitor.run(
                *keeper_command(self.monitor, "show", "uri", "--formation", "monitor"),
                check=False,
            )
            if result.returncode == 0 and result.stdout.strip():
                return result.stdout.strip()
            if time.monotonic() > deadline:
                raise TimeoutError(f"monitor not up: {result.stderr}")
            time.sleep(0.2)

    def create_node(self, node: Node) -> None:
        node.run(
            "pg_autoctl", "create", "postgres",
            "--pgdata", str(node.data), "--pgport", str(node.port),
            "--hostname", node.address, "--name", node.name, "--monitor", self.monitor_uri,
            "--auth", "trust", "--no-ssl", "--pgctl", str(PG_BIN / "pg_ctl"),
        )  # fmt: skip
        with open(node.data / "pg_hba.conf", "a") as f:
            f.write(HBA)  # geminikv and the tests connect as postgres from the subnet
        for name, value in KEEPER_SETTINGS.items():
            node.run(*keeper_command(node, "config", "set", name, value))

    def run_keeper(self, node: Node) -> None:
        """``pg_autoctl run``: the keeper, which starts and supervises the node's
        PostgreSQL (an old primary coming back this way rejoins as a standby)."""
        node.wait_reaped()
        node.spawn(*keeper_command(node, "run"), log=node.home / "pg_autoctl.log")

    # -- what the monitor says ------------------------------------------------------------

    def states(self) -> dict[str, tuple[str, str]]:
        """Node name -> (reported state, assigned state), as the monitor has them."""
        result = self.monitor.run(*keeper_command(self.monitor, "show", "state", "--json"))
        rows: list[dict[str, Any]] = json.loads(result.stdout)
        return {
            row["nodename"]: (row["current_group_state"], row["assigned_group_state"])
            for row in rows
        }

    def wait(
        self,
        predicate: Callable[[dict[str, tuple[str, str]]], bool],
        what: str,
        timeout: float = 60,
    ) -> dict[str, tuple[str, str]]:
        deadline = time.monotonic() + timeout
        states: dict[str, tuple[str, str]] = {}
        while True:
            try:
                states = self.states()
            except RuntimeError:  # the monitor busy restarting: ask again
                pass
            else:
                if predicate(states):
                    return states
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not reached in {timeout} s; states {states}")
            time.sleep(0.2)

    def wait_settled(self, timeout: float = 60) -> tuple[Node, Node]:
        """Until one node is primary and the other secondary (reported and assigned);
        returns (primary, secondary)."""
        states = self.wait(
            lambda s: sorted(s.values()) == [("primary", "primary"), ("secondary", "secondary")],
            "a primary and a secondary",
            timeout,
        )
        return self.node_in(states, "primary"), self.node_in(states, "secondary")

    def wait_primary(self, node: Node, timeout: float = 60) -> None:
        """Until ``node`` accepts writes as the monitor's primary, alone or with a standby."""
        self.wait(
            lambda s: s.get(node.name, ("", ""))[0] in ("wait_primary", "primary"),
            f"{node.name} primary",
            timeout,
        )

    def node_in(self, states: dict[str, tuple[str, str]], state: str) -> Node:
        name = next(name for name, (reported, _) in states.items() if reported == state)
        return next(node for node in self.nodes if node.name == name)

    # -- operations -----------------------------------------------------------------------

    def events(self, count: int = 40) -> str:
        """The monitor's latest events (state changes and why), for failure messages."""
        result = self.monitor.run(
            *keeper_command(self.monitor, "show", "events", "--count", str(count)), check=False
        )
        return result.stdout + result.stderr

    def wait_synchronous(self, primary: Node, timeout: float = 30) -> str:
        """Until ``primary`` streams to a synchronous standby (every commit it acknowledges
        is then on the standby), as an operator checks before a planned switchover;
        returns what the primary reported."""
        query = (
            "SELECT format('synchronous_standby_names %L, standbys %s', "
            "current_setting('synchronous_standby_names'), "
            "COALESCE(string_agg(application_name || ' ' || state || ' ' || sync_state, "
            "', '), 'none')) FROM pg_stat_replication"
        )
        deadline = time.monotonic() + timeout
        while True:
            report = str(primary.sql(query))
            if " streaming sync" in report or " streaming quorum" in report:
                return report
            if time.monotonic() > deadline:
                raise TimeoutError(f"no synchronous standby in {timeout} s: {report}")
            time.sleep(0.1)

    def switchover(self) -> None:
        """A planned switchover, as an operator runs it against the monitor."""
        self.monitor.run(*keeper_command(self.monitor, "perform", "switchover"), timeout=120)
