"""geminikv's settings: one object, read from command-line flags and GEMINIKV_* variables.

Flag names follow Kine's (pkg/app/app.go) so geminikv can replace it on a command line;
every flag ``--some-flag`` can also be given as ``GEMINIKV_SOME_FLAG``.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, fields
from typing import Any

from geminikv import __version__

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in a Go-style duration ("5s", "1m30s", "100ms"); a bare number is seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    pos, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (use e.g. 5s, 100ms, 1m)")
    return total


@dataclass(frozen=True, slots=True)
class Settings:
    listen_address: str = "127.0.0.1:2379"
    endpoint: str = ""
    data_dir: str = "./geminikv-data"
    emulated_etcd_version: str = "3.5.16"
    watch_progress_notify_interval: float = 5.0
    poll_interval: float = 1.0
    compact_interval: float = 0.0
    compact_min_retain: int = 1000
    compact_batch_size: int = 1000
    metrics_bind_address: str = ":8080"
    server_cert_file: str = ""
    server_key_file: str = ""
    trusted_ca_file: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    skip_verify: bool = False
    datastore_max_open_connections: int = 10
    datastore_max_idle_connections: int = 0
    datastore_connection_max_lifetime: float = 0.0
    datastore_connection_max_idle_time: float = 120.0
    value_cache_size: int = 128
    batch_wait: float = 0.005
    slow_sql_threshold: float = 1.0
    slow_sql_warning_threshold: float = 5.0
    log_format: str = "plain"
    debug: bool = False


_HELP: dict[str, str] = {
    "listen_address": "address to serve etcd v3 gRPC on: host:port, http://host:port or unix://path",
    "endpoint": "PostgreSQL DSN (postgres://user:pass@host:5432/db); empty = embedded PostgreSQL",
    "data_dir": "directory of the embedded PostgreSQL (used when --endpoint is empty)",
    "emulated_etcd_version": "etcd version reported by Maintenance.Status",
    "watch_progress_notify_interval": "interval of watch progress notifications",
    "poll_interval": "how often to poll for rows written without a notification (Go Kine)",
    "compact_interval": "automatic compaction interval (0 = off; kube-apiserver compacts)",
    "compact_min_retain": "revisions automatic compaction always keeps",
    "compact_batch_size": "revisions compacted per automatic compaction step",
    "metrics_bind_address": "address for /metrics, /healthz and /readyz (0 = off)",
    "server_cert_file": "TLS certificate for the etcd endpoint (with --server-key-file)",
    "server_key_file": "TLS key for the etcd endpoint",
    "trusted_ca_file": "CA for client certificates: when set, clients must present one",
    "ca_file": "CA that signed PostgreSQL's certificate (enables TLS to PostgreSQL)",
    "cert_file": "client certificate presented to PostgreSQL (with --key-file)",
    "key_file": "key of the client certificate presented to PostgreSQL",
    "skip_verify": "TLS to PostgreSQL without verifying its certificate",
    "datastore_max_open_connections": "PostgreSQL connections in the read pool",
    "datastore_max_idle_connections": "accepted for Kine compatibility; no effect (idle "
    "connections are closed after --datastore-connection-max-idle-time)",
    "datastore_connection_max_lifetime": "accepted for Kine compatibility; no effect",
    "datastore_connection_max_idle_time": "close pooled connections idle this long",
    "value_cache_size": "MiB of values kept in memory (0 = read every value from PostgreSQL)",
    "batch_wait": "under load, how long a write batch or a linearizable read's revision "
    "check may wait for more requests to share it (0 = never)",
    "slow_sql_threshold": "log SQL statements slower than this (info; 0 = off)",
    "slow_sql_warning_threshold": "log SQL statements slower than this as warnings (0 = off)",
    "log_format": "plain or json",
    "debug": "debug logging",
}


def _env_name(field: str) -> str:
    return "GEMINIKV_" + field.upper()


def build_parser(prog: str = "geminikv") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="An etcd v3 server backed by PostgreSQL (Kine's table layout). "
        "Every flag can also be set as GEMINIKV_<FLAG> (e.g. GEMINIKV_ENDPOINT).",
    )
    parser.add_argument("--version", action="version", version=f"geminikv {__version__}")
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        env = os.environ.get(_env_name(f.name))
        default: Any = f.default
        kind: Any
        if f.type == "bool":
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=(env.lower() in ("1", "true", "yes")) if env is not None else default,
                help=f"{_HELP[f.name]} [env {_env_name(f.name)}]",
            )
            continue
        kind = {"float": parse_duration, "int": int, "str": str}[str(f.type)]
        if env is not None:
            default = kind(env)
        parser.add_argument(
            flag,
            type=kind,
            default=default,
            help=f"{_HELP[f.name]} (default {f.default!r}) [env {_env_name(f.name)}]",
        )
    return parser


def settings_from(namespace: argparse.Namespace) -> Settings:
    return Settings(**{f.name: getattr(namespace, f.name) for f in fields(Settings)})
