"""White-box checks of how requests are grouped: the sizes a ``Gather`` records."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from geminikv.mvcc.gather import Gather


@contextlib.contextmanager
def batch_sizes(gather: Gather) -> Iterator[list[int]]:
    """The size of every batch that goes out meanwhile, in order."""
    sizes: list[int] = []
    taken = gather.taken

    def record(size: int) -> None:
        sizes.append(size)
        taken(size)

    gather.taken = record  # type: ignore[method-assign]
    try:
        yield sizes
    finally:
        gather.taken = taken  # type: ignore[method-assign]
