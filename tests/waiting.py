"""Waiting in tests: poll a condition until it holds, or fail saying what never happened.

The one way tests wait for something another thread, process or server brings about;
``eventually_async`` is the same for code that must keep its event loop running.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

Awaited = str | Callable[[], str]


def eventually(
    condition: Callable[[], T], awaited: Awaited, timeout: float = 10.0, interval: float = 0.05
) -> T:
    """Call ``condition`` every ``interval`` seconds until it returns something true, and
    return that; after ``timeout`` seconds, raise an AssertionError saying what was
    ``awaited`` (a function is called then, to describe the state at the deadline).

    An exception from ``condition`` (a failed assertion, say) ends the wait at once."""
    attempt = _attempts(condition, awaited, timeout)
    while not (value := attempt()):
        time.sleep(interval)
    return value


async def eventually_async(
    condition: Callable[[], T], awaited: Awaited, timeout: float = 10.0, interval: float = 0.05
) -> T:
    """``eventually``, sleeping on the running event loop between calls."""
    attempt = _attempts(condition, awaited, timeout)
    while not (value := attempt()):
        await asyncio.sleep(interval)
    return value


def _attempts(condition: Callable[[], T], awaited: Awaited, timeout: float) -> Callable[[], T]:
    """One try of ``condition`` per call: its value, or AssertionError once past the deadline."""
    deadline = time.monotonic() + timeout

    def attempt() -> T:
        value = condition()
        if not value and time.monotonic() >= deadline:
            raise AssertionError(_timed_out(awaited, timeout, value))
        return value

    return attempt


def _timed_out(awaited: Awaited, timeout: float, value: object) -> str:
    what = awaited if isinstance(awaited, str) else awaited()
    last = "" if value is None or isinstance(value, bool) else f" (last: {value!r})"
    return f"not within {timeout:g}s: {what}{last}"
