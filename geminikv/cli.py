"""The ``geminikv`` command: serve (default), or ``bench`` (the benchmark harness)."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys

from geminikv import log as logsetup
from geminikv.config import no_effect, parse_settings
from geminikv.storage.database import DatabaseUnreachable
from geminikv.storage.embedded import EmbeddedPostgresError


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "bench":
        return _bench(args[1:])
    if args and args[0] == "serve":
        args = args[1:]
    settings = parse_settings(args)
    logsetup.setup(settings.log_format, settings.debug)
    log = logging.getLogger("geminikv")
    for line in no_effect(settings):
        log.warning("%s", line)
    try:
        import uvloop

        uvloop.run(_serve(settings))
    except (DatabaseUnreachable, EmbeddedPostgresError, OSError, ValueError) as err:
        log.error("%s", err)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


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


async def _serve(settings: object) -> None:
    from geminikv.server.app import serve

    await serve(settings)  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main())
