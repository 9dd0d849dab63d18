"""Plain streaming replication without a manager: a primary, a synchronous standby made
with pg_basebackup, ``pg_ctl promote`` and ``pg_rewind`` done by the test (the operator)."""

from __future__ import annotations

import time

from tests.ha.net import SUBNET
from tests.ha.node import PG_BIN, Node

# wal_log_hints: pg_rewind needs it (or data checksums) to bring an old primary back.
SETTINGS = """
listen_addresses = '{address}'
port = {port}
unix_socket_directories = '{home}'
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
wal_keep_size = '256MB'
hot_standby = on
wal_log_hints = on
synchronous_commit = on
synchronous_standby_names = '*'
wal_receiver_status_interval = 1s
log_line_prefix = '%m [%p] '
"""

HBA = f"""
local all all trust
local replication all trust
host all all {SUBNET}.0/24 trust
host replication all {SUBNET}.0/24 trust
"""


def configure(node: Node) -> None:
    """The node's own settings (a pg_basebackup copy carries the source's)."""
    conf = node.data / "postgresql.conf"
    text = conf.read_text() if conf.exists() else ""
    text += SETTINGS.format(address=node.address, port=node.port, home=node.home)
    conf.write_text(text)
    (node.data / "pg_hba.conf").write_text(HBA)


def start(node: Node) -> None:
    node.pg_ctl("start", "-w", "-l", str(node.log), "-t", "60")
    node.wait_ready()


def standby_conninfo(source: Node, standby: Node) -> str:
    return (
        f"host={source.address} port={source.port} user=postgres "
        f"application_name={standby.name} connect_timeout=2"
    )


def set_standby_of(node: Node, source: Node) -> None:
    """standby.signal and primary_conninfo (pg_basebackup/pg_rewind -R write the same)."""
    (node.data / "standby.signal").touch()
    with open(node.data / "postgresql.auto.conf", "a") as f:
        f.write(f"primary_conninfo = '{standby_conninfo(source, node)}'\n")


def set_sync(node: Node, on: bool) -> None:
    """Whether commits on ``node`` wait for a standby (an alone primary must not)."""
    value = "*" if on else ""
    node.sql(f"ALTER SYSTEM SET synchronous_standby_names = '{value}'")
    node.sql("SELECT pg_reload_conf()")


def init_primary(node: Node) -> None:
    node.run(
        str(PG_BIN / "initdb"), "-D", str(node.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"
    )
    configure(node)
    start(node)


def init_standby(node: Node, source: Node) -> None:
    node.run(
        str(PG_BIN / "pg_basebackup"),
        "-h", source.address, "-p", str(source.port), "-U", "postgres",
        "-D", str(node.data), "-X", "stream", "-c", "fast",
    )  # fmt: skip
    configure(node)
    set_standby_of(node, source)
    start(node)
    wait_streaming(source, node)


def wait_streaming(primary: Node, standby: Node, timeout: float = 60) -> None:
    """Until ``primary`` sees ``standby`` as its synchronous standby."""
    deadline = time.monotonic() + timeout
    while True:
        state = primary.sql(
            "SELECT sync_state FROM pg_stat_replication WHERE application_name = $1", standby.name
        )
        if state == "sync":
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{standby.name} not a sync standby of {primary.name}: {state}")
        time.sleep(0.1)


def promote(node: Node) -> None:
    """The standby becomes a primary that commits alone (its standby is gone)."""
    # Set before promoting: a standby ignores it, and the new primary never blocks a commit.
    with open(node.data / "postgresql.auto.conf", "a") as f:
        f.write("synchronous_standby_names = ''\n")
    node.pg_ctl("reload")
    node.pg_ctl("promote", "-w", "-t", "60")
    deadline = time.monotonic() + 30
    while node.in_recovery():
        assert time.monotonic() < deadline, f"{node.name} did not leave recovery"
        time.sleep(0.05)


def rejoin(old: Node, primary: Node) -> None:
    """The old primary back as a synchronous standby of ``primary``: pg_rewind drops what
    it had that the new timeline lacks (it runs crash recovery first if it was killed)."""
    # pg_rewind reads the source's timeline from its control file, which a promotion
    # updates only at its next checkpoint ("same timeline, no rewind required" otherwise).
    primary.sql("CHECKPOINT")
    old.wait_reaped()
    source = f"host={primary.address} port={primary.port} user=postgres dbname=postgres"
    old.run(str(PG_BIN / "pg_rewind"), "-D", str(old.data), "--source-server", source)
    # pg_rewind copied the source's configuration files: the old primary's own again
    (old.data / "postgresql.auto.conf").write_text("")
    configure(old)
    set_standby_of(old, primary)
    start(old)
    set_sync(primary, True)
    wait_streaming(primary, old)
