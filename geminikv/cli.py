"""The ``geminikv`` command: serve (default), or ``bench`` (the benchmark harness)."""

from __future__ import annotations

import logging
import sys

from geminikv import log as logsetup
from geminikv.config import no_effect, parse_settings
from geminikv.storage.database import DatabaseUnreachable
from geminikv.storage.embedded import EmbeddedPostgresError


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "bench":
        from benchmarks.cli import main as bench

        return bench(args[1:])
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


async def _serve(settings: object) -> None:
    from geminikv.server.app import serve

    await serve(settings)  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main())
