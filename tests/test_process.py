"""What a serving process sets up for itself once started: the garbage collector."""

from __future__ import annotations

import gc

from geminikv.config import GC_YOUNG_THRESHOLD
from geminikv.server.app import settle_gc


def test_settle_gc_freezes_start_up_objects_and_collects_young_ones_less_often() -> None:
    before = gc.get_threshold()
    survivor = [object()]  # start-up state: tracked, and alive when serving begins
    assert gc.is_tracked(survivor)
    try:
        settle_gc()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD
        assert gc.get_threshold()[1:] == before[1:]
        # frozen: in no generation, so no collection (a full one included) looks at it
        gc.collect()
        assert not any(o is survivor for o in gc.get_objects())
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
    assert any(o is survivor for o in gc.get_objects())
