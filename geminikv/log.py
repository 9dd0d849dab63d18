"""Logging: one line per event, plain or JSON (--log-format).

A traceback stays on its event's line: escaped newlines (``\\n``) in plain text, the
``error`` field in JSON, so a log collector never splits one event into many.
"""

from __future__ import annotations

import logging
import sys
import time

import orjson

PLAIN = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Formatter(logging.Formatter):
    """One line per record: plain text, or one JSON object with ``json=True``."""

    def __init__(self, json: bool = False, worker: int | None = None) -> None:
        # a worker of several (--workers) says which one it is on each line
        super().__init__(
            PLAIN if worker is None else PLAIN.replace("%(name)s", f"worker {worker} %(name)s")
        )
        self.json = json
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        if not self.json:
            # the message, the traceback and any stack, newlines escaped
            return super().format(record).replace("\r", "\\r").replace("\n", "\\n")
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.worker is not None:
            entry["worker"] = self.worker
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry).decode()


def setup(fmt: str = "plain", debug: bool = False, worker: int | None = None) -> None:
    """Send every log record to stderr, one line each, as ``fmt`` (plain or json);
    ``worker``: this process's number among several serving processes."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(Formatter(json=fmt == "json", worker=worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("asyncio").setLevel(logging.WARNING)
