"""One serving process: the server (``--workers 1``) or one of its workers. Apart from
``cli`` so that the workers' supervisor can start it without importing the command line."""

from __future__ import annotations

import logging
from collections.abc import Callable

from geminikv.config import Settings
from geminikv.storage.database import DatabaseUnreachable
from geminikv.storage.embedded import EmbeddedPostgresError


def serve_process(settings: Settings, serving: Callable[[], None] | None = None) -> int:
    """Serve until SIGTERM or SIGINT in this process (the server, or one of its workers);
    the exit code. ``serving`` is told once it serves."""
    log = logging.getLogger("geminikv")
    try:
        import uvloop

        uvloop.run(_serve(settings, serving))
    except (DatabaseUnreachable, EmbeddedPostgresError, OSError, ValueError) as err:
        log.error("%s", err)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


async def _serve(settings: Settings, serving: Callable[[], None] | None) -> None:
    from geminikv.server.app import serve

    await serve(settings, serving)
