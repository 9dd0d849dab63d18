"""geminikv's settings: one object, read from command-line flags and GEMINIKV_* variables.

Flag names and value syntax follow Kine's (pkg/app/app.go) so geminikv can replace it on
a command line; every flag ``--some-flag`` can also be given as ``GEMINIKV_SOME_FLAG``,
and the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import Field, dataclass, field, fields
from typing import Any, TypeVar

from geminikv import __version__

# Go's time.ParseDuration: an optional sign, then numbers each with a unit.
_DURATION = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
T = TypeVar("T")
_TRUE = ("1", "t", "true", "yes", "on")
_FALSE = ("0", "f", "false", "no", "off")

# Kine's 0 (or less) for --datastore-max-open-connections means no limit; asyncpg's pool
# needs a number, and PostgreSQL's default max_connections (100) is the real limit then.
UNLIMITED_CONNECTIONS = 100

# -- tuning: fixed values, not settings ----------------------------------------------------

# etcd's limits on requests
MAX_REQUEST_BYTES = 1536 * 1024  # etcd's --max-request-bytes default (1.5 MiB)
GRPC_MAX_RECEIVE_BYTES = MAX_REQUEST_BYTES + 512 * 1024  # etcd's gRPC overhead allowance
MAX_TXN_OPS = 128  # etcd's --max-txn-ops default

# Batching: how long a write batch or a linearizable read's revision check may wait for
# more requests to share it (--batch-wait's default).
BATCH_WAIT = 0.005

# Watch delivery
WATCH_CATCH_UP_ROWS = 1000  # etcd batches at most 1000 revisions per catch-up response
WATCH_MAX_QUEUED_EVENTS = 2000  # per watcher; beyond it the watcher catches up from the table
WATCH_IDLE_RECHECK = 1.0  # seconds the catch-up task waits for a stream to drain, at most
WATCH_RETRY_DELAY = 0.5  # seconds before the catch-up task retries a failed read
WATCH_MAX_RESPONSE_BYTES = MAX_REQUEST_BYTES  # fragments are cut at etcd's max request size
WATCH_COALESCE_SECONDS = 0.002  # a busy stream lets events gather this long between writes

# The follower and the index
DEFRAGMENT_TIMEOUT = 3600.0  # seconds a Defragment's VACUUM may take (not the command timeout)
MEMBER_SEEN_WITHIN_MS = 10_000  # a process that announced itself this recently is a member
FOLLOWER_FETCH_LIMIT = 1000  # rows per catch-up query (Kine's --poll-batch-size default)
FOLLOWER_RETRY_MIN = 0.05  # seconds before the follower's first retry after a failed fetch
FOLLOWER_RETRY_MAX = 0.5  # ... and between retries while PostgreSQL stays away
GAP_GRACE = 0.05  # seconds a missing id may stay missing before it is filled
INDEX_COMPACT_SLICE = 20_000  # superseded revisions dropped from the index per loop turn
LAG_MARKS = 1024  # (revision, first known) pairs kept for the lag-in-seconds metric
REBUILD_RETRY = 1.0  # seconds between attempts to load the table into a new index
LOAD_PREFETCH = 20_000  # rows per round trip while loading the table at start-up
# Maintenance.Snapshot: rows (values included, so memory is this times the largest value)
# per round trip, and per hand-over to the file writer's thread
SNAPSHOT_PREFETCH = 500

# The HTTP gateway: a JSON body is base64 (4/3) of at most etcd's max request, with room
# for the JSON around it; etcd's ReqTimeout (5 s + 2 election timeouts) bounds /health's read.
GATEWAY_MAX_BODY_BYTES = 2 * GRPC_MAX_RECEIVE_BYTES
HEALTH_READ_TIMEOUT = 7.0

# Background tasks
TASK_CANCEL_AGAIN = 1.0  # seconds before a task that did not end when cancelled is cancelled again

# Writes
WRITER_MAX_BATCH = 512  # requests in one write batch (one PostgreSQL transaction)
WRITER_RECONNECT_MAX_DELAY = 0.5  # seconds between the writer's attempts to reconnect, at most
COMPACT_DELETE_BATCH = 500  # ids per DELETE: milliseconds per statement on any table size

# Leases and the leader's duties
REVOKES_PER_WRITE = 64  # expired leases revoked in one write
EXPIRED_PER_RUN = 10_000  # expired leases read per expiry run
LEADER_RETRY_LOCK = 1.0  # seconds between attempts to take the leader lock
LEADER_MAX_SLEEP = 0.5  # seconds the leader sleeps between duties, at most
# etcd's Lessor.Promote(ElectionTimeout): a new leader gives every lease its TTL plus this
# (etcd's default election timeout), since it cannot know when the last keep-alive came
LEASE_PROMOTE_EXTENSION = 1.0
# etcd's request timeout (5 s + 2 election timeouts): how long a keep-alive or TimeToLive
# of a lease past its expiry waits for the leader to revoke it or to renew it on taking over
OVERDUE_LEASE_WAIT = 7.0
OVERDUE_LEASE_POLL = 0.1  # seconds between looks at such a lease while waiting

# gRPC servers per process on the listen address (server/listeners.py): 8 as etcd's
# benchmark opens 8 connections; more cost nothing while idle
GRPC_LISTENERS = 8

# Workers (--workers above 1): a worker that dies after serving is started again after
# this many seconds; on shutdown each worker gets this long to stop before SIGKILL
WORKER_RESTART_DELAY = 1.0
WORKER_STOP_TIMEOUT = 30.0

# Auth: how often every process checks the auth revision behind the notifications
AUTH_POLL_INTERVAL = 1.0

# The serving process
HEARTBEAT_RETRY = 0.2  # seconds between attempts to reach a primary while none answers
LEASE_COUNT_INTERVAL = 5.0  # seconds between counts of geminikv_lease for the metric
# Python's default (700) runs a young collection every ~25 requests under load.
GC_YOUNG_THRESHOLD = 10_000
# Blocks of this size or more are mmapped, so freeing them gives the memory back at once.
MALLOC_MMAP_THRESHOLD = 256 * 1024


def parse_duration(text: str) -> float:
    """Seconds in a Go duration ("5s", "1m30s", "100ms", "-1s"); a bare number is seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.removeprefix("+"))
    pos, total = 0, 0.0
    for match in _DURATION.finditer(body):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(body) or not body:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (use e.g. 5s, 100ms, 1m)")
    return sign * total


def _integer(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None


def _checked(parse: Callable[[str], Any], ok: Callable[[Any], bool], problem: str) -> Any:
    """``parse``, then refuse values ``ok`` rejects with "invalid <problem>"."""

    def read(text: str) -> Any:
        value = parse(text)
        if not ok(value):
            what, _, rule = problem.partition(":")
            raise argparse.ArgumentTypeError(f"invalid {what} {text!r}:{rule}")
        return value

    return read


_duration = _checked(parse_duration, lambda v: v >= 0, "duration: must not be negative")
_positive = _checked(_integer, lambda v: v >= 1, "value: must be at least 1")
_percent = _checked(_integer, lambda v: 0 <= v < 100, "percentage: must be 0 to 99")


def _duration_or_off(text: str) -> float:
    """A duration where Kine reads 0 or less as off (or no limit): 0 here."""
    return max(0.0, parse_duration(text))


def auth_token_options(text: str) -> tuple[str, dict[str, str]]:
    """etcd's --auth-token (decomposeOpts): a token type, then comma-separated
    ``name=value`` options, each at most once."""
    kind, *rest = text.split(",")
    options: dict[str, str] = {}
    for item in rest:
        name, eq, value = item.partition("=")
        if not eq or "=" in value or name in options:
            raise argparse.ArgumentTypeError(f"invalid auth token option {item!r}")
        options[name] = value
    if kind not in ("simple", "jwt"):
        raise argparse.ArgumentTypeError(f"invalid auth token type {kind!r} (simple or jwt)")
    return kind, options


def _auth_token(text: str) -> str:
    auth_token_options(text)
    return text


def _connections(text: str) -> int:
    value = _integer(text)
    return UNLIMITED_CONNECTIONS if value <= 0 else value


def _log_format(text: str) -> str:
    if text not in ("plain", "json"):
        raise argparse.ArgumentTypeError(f"invalid log format {text!r} (plain or json)")
    return text


def parse_bool(text: str) -> bool:
    """Go's strconv.ParseBool spellings (true, false, 1, 0, t, f, ...), and yes/no, on/off."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r} (true or false)")


def _flag(default: T, usage: str, parse: Callable[[str], Any] | None = None) -> T:
    """A setting's default, its --help text and, where its type does not say, how its text
    is read (as Kine declares a flag: Value, Usage)."""
    return field(default=default, metadata={"usage": usage, "parse": parse})


@dataclass(frozen=True, slots=True)
class Settings:
    listen_address: str = _flag(
        "127.0.0.1:2379",
        "address to serve etcd v3 gRPC on: host:port, http://host:port or unix://path",
    )
    workers: int = _flag(
        1,
        "serving processes sharing the listen address (SO_REUSEPORT) and the database, each "
        "with its own index; 0 = one per CPU core. Above 1 a supervising process owns the "
        "embedded PostgreSQL and restarts a worker that dies; worker i (from 0) serves "
        "metrics on the metrics port + i",
        _checked(_integer, lambda v: v >= 0, "worker count: must be 0 or more"),
    )
    grpc_listeners: int = _flag(
        GRPC_LISTENERS,
        "gRPC servers in each process sharing the listen address (SO_REUSEPORT): grpc.aio "
        "takes one call at a time per server, so with several client connections more "
        "servers take more calls at once; a unix:// address has one",
        _positive,
    )
    endpoint: str = _flag(
        "",
        "PostgreSQL DSN (postgres://user:pass@host:5432/db); several hosts as libpq writes "
        "them (postgres://user@h1:5432,h2:5432/db), of which geminikv uses the writable "
        "primary; empty = embedded PostgreSQL",
    )
    data_dir: str = _flag(
        "./geminikv-data", "directory of the embedded PostgreSQL (used when --endpoint is empty)"
    )
    name: str = _flag("default", "member name in Cluster.MemberList, as etcd's --name")
    emulated_etcd_version: str = _flag("3.5.16", "etcd version reported by Maintenance.Status")
    watch_progress_notify_interval: float = _flag(5.0, "interval of watch progress notifications")
    poll_interval: float = _flag(
        1.0, "how often to poll for rows written without a notification (Go Kine)"
    )
    poll_batch_size: int = _flag(
        FOLLOWER_FETCH_LIMIT, "rows fetched per query when catching up with the table", _positive
    )
    compact_interval: float = _flag(
        0.0, "automatic compaction interval (0 = off; kube-apiserver compacts)", _duration_or_off
    )
    compact_interval_jitter: int = _flag(
        0, "Kine's +/- percent of jitter on --compact-interval (0 to 99)", _percent
    )
    compact_timeout: float = _flag(
        5.0,
        "timeout of each compaction DELETE statement (0 = none; Kine: of each compaction batch)",
        _duration_or_off,
    )
    compact_min_retain: int = _flag(1000, "revisions automatic compaction always keeps")
    compact_batch_size: int = _flag(1000, "revisions compacted per automatic compaction step")
    quota_backend_bytes: int = _flag(
        0,
        "raise etcd's NOSPACE alarm when Kine's table (indexes included) would outgrow this "
        "many bytes (0 = no quota: PostgreSQL's disk is the limit)",
        _checked(_integer, lambda v: v >= 0, "size: must not be negative"),
    )
    metrics_bind_address: str = _flag(
        ":8080", "address for /metrics, /healthz and /readyz (0 = off)"
    )
    http_listen_address: str = _flag(
        "",
        "address (host:port) for etcd's HTTP endpoints: the gRPC-JSON gateway (/v3/...), "
        "/version, /health and /metrics (empty or 0 = off)",
    )
    metrics_enable_profiling: bool = _flag(False, "Kine's pprof handlers on the metrics address")
    metrics_ignore_tls_config: bool = _flag(
        False, "Kine's /metrics without the server TLS settings"
    )
    server_cert_file: str = _flag(
        "", "TLS certificate for the etcd endpoint (with --server-key-file)"
    )
    server_key_file: str = _flag("", "TLS key for the etcd endpoint")
    trusted_ca_file: str = _flag(
        "", "CA for client certificates: when set, clients must present one"
    )
    client_cert_auth: bool = _flag(
        False,
        "etcd's --client-cert-auth: while auth is enabled, a request without a token is "
        "made as the user its TLS client certificate's common name names (with "
        "--trusted-ca-file)",
    )
    auth_token: str = _flag(
        "simple",
        "etcd's --auth-token: simple, or jwt,pub-key=FILE,priv-key=FILE,"
        "sign-method=RS256|ES256|...,ttl=DURATION",
        _auth_token,
    )
    auth_token_ttl: int = _flag(300, "seconds a simple token lives after its last use", _positive)
    bcrypt_cost: int = _flag(10, "bcrypt cost of password hashes (4 to 31, as etcd's)")
    ca_file: str = _flag("", "CA that signed PostgreSQL's certificate (enables TLS to PostgreSQL)")
    cert_file: str = _flag("", "client certificate presented to PostgreSQL (with --key-file)")
    key_file: str = _flag("", "key of the client certificate presented to PostgreSQL")
    skip_verify: bool = _flag(False, "TLS to PostgreSQL without verifying its certificate")
    datastore_max_open_connections: int = _flag(
        10,
        "PostgreSQL connections in the read pool; 0 or less = no limit, as in Kine (capped at "
        f"{UNLIMITED_CONNECTIONS}, PostgreSQL's default max_connections)",
        _connections,
    )
    datastore_max_idle_connections: int = _flag(0, "Kine's idle connections kept in the pool")
    datastore_connection_max_lifetime: float = _flag(
        0.0, "Kine's longest life of a pooled connection", _duration_or_off
    )
    datastore_connection_max_idle_time: float = _flag(
        120.0, "close pooled connections idle this long (0 = never)", _duration_or_off
    )
    datastore_connect_timeout: float = _flag(
        2.0,
        "time to connect to one PostgreSQL host of --endpoint and learn whether it is the "
        "primary (all hosts are tried at once; 0 = no limit)",
        _duration_or_off,
    )
    datastore_command_timeout: float = _flag(
        10.0,
        "longest time a SQL statement may take before the connection is given up as lost "
        "(0 = no limit; automatic compaction's own statements use --compact-timeout)",
        _duration_or_off,
    )
    datastore_tcp_timeout: float = _flag(
        5.0,
        "TCP keepalives and TCP_USER_TIMEOUT on PostgreSQL connections: a host that stops "
        "acknowledging is dropped after this long (0 = the kernel's defaults)",
        _duration_or_off,
    )
    datastore_heartbeat_interval: float = _flag(
        1.0,
        "how often to ask the PostgreSQL primary whether it still is one (0 = off)",
        _duration_or_off,
    )
    datastore_heartbeat_timeout: float = _flag(
        2.0,
        "a primary that does not answer the heartbeat within this long is taken as gone: "
        "every connection to it is dropped and the hosts of --endpoint are tried again",
        _duration_or_off,
    )
    value_cache_size: int = _flag(
        128, "MiB of values kept in memory (0 = read every value from PostgreSQL)"
    )
    batch_wait: float = _flag(
        BATCH_WAIT,
        "under load, how long a write batch or a linearizable read's revision check may wait "
        "for more requests to share it, and a serializable read for others to be answered "
        "with (0 = never)",
    )
    slow_sql_threshold: float = _flag(
        1.0, "log SQL statements slower than this (info; 0 = off)", _duration_or_off
    )
    slow_sql_warning_threshold: float = _flag(
        5.0, "log SQL statements slower than this as warnings (0 = off)", _duration_or_off
    )
    log_format: str = _flag("plain", "plain or json", _log_format)
    debug: bool = _flag(False, "debug logging")


# Kine's flags that do nothing in geminikv, and why: accepted so a Kine command line
# works, each logged once at start-up when set.
_POOL_IDLE = "asyncpg's pool closes idle connections after --datastore-connection-max-idle-time"
NO_EFFECT: dict[str, str] = {
    "datastore_max_idle_connections": _POOL_IDLE,
    "datastore_connection_max_lifetime": _POOL_IDLE,
    "compact_interval_jitter": "only the leader process compacts, so there are no "
    "simultaneous compactions to spread",
    "metrics_enable_profiling": "geminikv serves no profiling endpoints",
    "metrics_ignore_tls_config": "geminikv serves /metrics over plain HTTP always",
}

# How each setting's text is read: by its type, unless the setting has a rule of its own.
_BY_TYPE: dict[str, Callable[[str], Any]] = {
    "float": _duration,
    "int": _integer,
    "str": str,
    "bool": parse_bool,
}
_METAVAR = {"float": "DURATION", "int": "N", "str": "TEXT"}


def _parser_of(setting: Field[Any]) -> Callable[[str], Any]:
    return setting.metadata["parse"] or _BY_TYPE[str(setting.type)]


def _env_name(field: str) -> str:
    return "GEMINIKV_" + field.upper()


def _shown(default: object, kind: str) -> str:
    if kind == "bool":
        return "on" if default else "off"
    if kind == "float":
        seconds = float(default)  # type: ignore[arg-type]
        if seconds and seconds % 60 == 0:
            return f"{seconds / 60:g}m"
        return f"{seconds:g}s" if seconds >= 1 or not seconds else f"{seconds * 1000:g}ms"
    return repr(default)


def _help(setting: Field[Any]) -> str:
    name, kind, text = setting.name, str(setting.type), setting.metadata["usage"]
    if name in NO_EFFECT:
        text += f": accepted for Kine compatibility, no effect ({NO_EFFECT[name]})"
    shown = _shown(setting.default, kind)
    return f"{text} (default {shown}) [env {_env_name(name)}]".replace("%", "%%")


def build_parser(prog: str = "geminikv") -> argparse.ArgumentParser:
    """The command line: one flag per setting. A flag not given is absent from the result."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="An etcd v3 server backed by PostgreSQL (Kine's table layout). "
        "Every flag can also be set as GEMINIKV_<FLAG> (e.g. GEMINIKV_ENDPOINT); the "
        "command line wins. Durations are Go's (5s, 1m30s, 100ms; a bare number is "
        "seconds). `geminikv bench --help` describes the benchmark harness.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("-v", "--version", action="version", version=f"geminikv {__version__}")
    add_setting_flags(parser, [f.name for f in fields(Settings)])
    return parser


def add_setting_flags(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    """The flags of these settings, as the server declares them (also for subcommands
    that reach the same database, e.g. ``load-snapshot``)."""
    chosen = set(names)
    for f in fields(Settings):
        if f.name not in chosen:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        text = _help(f)
        if kind == "bool":
            # Kine's (urfave/cli) spellings: --flag, --flag=true, --flag=false
            parser.add_argument(
                flag,
                nargs="?",
                const=True,
                type=parse_bool,
                metavar="BOOL",
                help=text,
                default=argparse.SUPPRESS,  # a flag not given is absent
            )
            continue
        parser.add_argument(
            flag,
            type=_parser_of(f),
            metavar=_METAVAR[kind],
            help=text,
            default=argparse.SUPPRESS,
        )


def parse_settings(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    prog: str = "geminikv",
) -> Settings:
    """Settings from the command line, then GEMINIKV_* variables, then the defaults.

    A bad value, on the command line or in the environment, exits with status 2 and a
    message naming the flag or the variable, as argparse does.
    """
    parser = build_parser(prog)
    return settings_from(parser, vars(parser.parse_args(argv)), environ)


def settings_from(
    parser: argparse.ArgumentParser,
    values: dict[str, Any],
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Settings from parsed flags (those given), then GEMINIKV_* variables, then the
    defaults; ``parser`` reports a bad variable."""
    values = {k: v for k, v in values.items() if k in _FIELD_NAMES}
    env = os.environ if environ is None else environ
    for f in fields(Settings):
        name = _env_name(f.name)
        if f.name in values or name not in env:
            continue
        try:
            values[f.name] = _parser_of(f)(env[name])
        except argparse.ArgumentTypeError as err:
            parser.error(f"{name}: {err}")
    return Settings(**values)


def no_effect(settings: Settings) -> list[str]:
    """One line for each flag set that geminikv accepts from Kine but does not act on."""
    return [
        f"--{name.replace('_', '-')} is accepted for Kine compatibility and has no effect "
        f"({reason})"
        for name, reason in NO_EFFECT.items()
        if getattr(settings, name) != getattr(_DEFAULTS, name)
    ]


_DEFAULTS = Settings()
_FIELD_NAMES = frozenset(f.name for f in fields(Settings))
