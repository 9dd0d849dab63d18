"""The ``geminikv`` command: serve (default), ``bench`` (the benchmark harness), or
``load-snapshot`` (an etcd snapshot into an empty database)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import logging
import sys
from dataclasses import replace
from typing import TYPE_CHECKING

from geminikv import log as logsetup
from geminikv import workers
from geminikv.config import Settings, add_setting_flags, no_effect, parse_settings, settings_from
from geminikv.serve import serve_process
from geminikv.storage.database import DatabaseUnreachable

if TYPE_CHECKING:
    from geminikv.snapshot.load import Loaded


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "bench":
        return _bench(args[1:])
    if args and args[0] == "load-snapshot":
        return _load_snapshot(args[1:])
    if args and args[0] == "serve":
        args = args[1:]
    settings = parse_settings(args)
    logsetup.setup(settings.log_format, settings.debug)
    log = logging.getLogger("geminikv")
    for line in no_effect(settings):
        log.warning("%s", line)
    count = workers.count(settings.workers)
    if count > 1:
        return workers.supervise(replace(settings, workers=count))
    return serve_process(replace(settings, workers=1))


# What `pip install 'geminikv[bench]'` adds (pyproject.toml's bench extra), by import name.
BENCH_MODULES = ("psutil", "matplotlib")
BENCH_MISSING = (
    "geminikv bench needs the benchmark extra, which is not installed (missing: {}):\n"
    "    pip install 'geminikv[bench]'\n"
    "(from a clone of the repository: pip install -c constraints.txt '.[bench]')"
)


def _bench(args: list[str]) -> int:
    """The harness (``geminikv_bench``, from the repository's benchmarks/), if its extra is
    installed; else say how to install it (exit code 1)."""
    missing = [name for name in BENCH_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        print(BENCH_MISSING.format(", ".join(missing)), file=sys.stderr)
        return 1
    # Imported by name: the server never imports the harness, and mypy does not follow it.
    harness = importlib.import_module("geminikv_bench.cli")
    return int(harness.main(args))


def _load_snapshot(args: list[str]) -> int:
    """Load an etcd snapshot (a file, or taken from a live etcd) into an empty database;
    exit code 1 with the reason when refused (nothing written)."""
    parser = argparse.ArgumentParser(
        prog="geminikv load-snapshot",
        description="Load an etcd v3 snapshot (etcd 3.4 or 3.5) into an empty geminikv "
        "database, keeping revisions, versions, the compact revision and leases.",
    )
    parser.add_argument("file", nargs="?", help="a file `etcdctl snapshot save` wrote")
    # PostgreSQL, given as the server is given it, flags or GEMINIKV_* variables (but
    # not the embedded one)
    add_setting_flags(parser, ["endpoint", "ca_file", "cert_file", "key_file", "skip_verify"])
    parser.add_argument(
        "--skip-hash-check",
        action="store_true",
        help="load a file without etcd's sha256 trailer (a db file copied from a data directory)",
    )
    parser.add_argument(
        "--etcd",
        default="",
        help="take the snapshot from this live etcd "
        "(host:port, http://… or https://…) instead of a file",
    )
    parser.add_argument("--cacert", default="", help="etcd: CA bundle (as etcdctl)")
    parser.add_argument("--cert", default="", help="etcd: client certificate (as etcdctl)")
    parser.add_argument("--key", default="", help="etcd: client key (as etcdctl)")
    parser.add_argument(
        "--insecure-skip-tls-verify",
        action="store_true",
        help="etcd: do not verify its certificate (as etcdctl)",
    )
    opts = parser.parse_args(args)
    database = settings_from(parser, vars(opts))
    if not database.endpoint:
        parser.error("--endpoint postgres://…/database is required")
    if bool(opts.file) == bool(opts.etcd):
        parser.error("give a snapshot file or --etcd, one of them")
    logsetup.setup("plain", False)
    from geminikv.snapshot.reader import SnapshotRefused

    try:
        loaded = asyncio.run(_load(opts, database))
    except (SnapshotRefused, DatabaseUnreachable, OSError, ValueError) as err:
        print(f"geminikv load-snapshot: {err}", file=sys.stderr)
        return 1
    print(
        f"loaded: revision {loaded.revision}, compact revision {loaded.compact_revision}, "
        f"{loaded.rows} rows, {loaded.leases} leases"
    )
    for etcd_id, new_id in sorted(loaded.renumbered.items()):
        # Kine's lease column holds 32 bits: etcd's 64-bit ids get new ones
        print(f"lease {etcd_id} ({etcd_id:#x}) is lease {new_id} ({new_id:#x})")
    return 0


async def _load(opts: argparse.Namespace, database: Settings) -> Loaded:
    import tempfile

    from geminikv.snapshot.load import load_file
    from geminikv.snapshot.pull import EtcdTLS, pull
    from geminikv.storage.database import Backend, client_tls, connect

    d = database
    tls = client_tls(d.ca_file, d.cert_file, d.key_file, d.skip_verify)
    backend = Backend.create(d.endpoint, tls)
    with tempfile.TemporaryDirectory(prefix="geminikv-load-") as work:
        path, ttls = opts.file, None
        if opts.etcd:
            path = f"{work}/etcd.db"
            etcd_tls = EtcdTLS(opts.cacert, opts.cert, opts.key, opts.insecure_skip_tls_verify)
            ttls = await asyncio.to_thread(pull, opts.etcd, path, etcd_tls)
        conn = await connect(backend, timeout=30)
        try:
            return await load_file(conn, path, opts.skip_hash_check, ttls)
        finally:
            await conn.close()


if __name__ == "__main__":
    sys.exit(main())
