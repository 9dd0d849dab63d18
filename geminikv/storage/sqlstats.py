"""Timing every SQL statement: a metric by statement name, and a log line when slow.

asyncpg reports each statement's duration to query loggers (``add_query_logger``);
one observer is attached to every connection geminikv opens.
"""

from __future__ import annotations

import logging

from asyncpg.connection import LoggedQuery

from geminikv import metrics
from geminikv.storage.queries import statement_name

log = logging.getLogger("geminikv.sql")


class SqlObserver:
    """Kine's --slow-sql-threshold (info) and --slow-sql-warning-threshold (warning)."""

    def __init__(self, slow: float = 1.0, warning: float = 5.0) -> None:
        self.slow = slow
        self.warning = warning

    def __call__(self, record: LoggedQuery) -> None:
        name = statement_name(record.query)
        metrics.SQL_SECONDS.labels(name).observe(record.elapsed)
        failed = record.exception is not None
        metrics.SQL_TOTAL.labels(name, "error" if failed else "ok").inc()
        if self.slow > 0 and record.elapsed >= self.slow:
            level = (
                logging.WARNING
                if self.warning > 0 and record.elapsed >= self.warning
                else logging.INFO
            )
            log.log(
                level,
                "slow SQL: statement=%s duration=%.3fs%s",
                name,
                record.elapsed,
                " (failed)" if failed else "",
            )
