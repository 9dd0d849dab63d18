"""A recorded history (history.py) saved and loaded back. No servers."""

from __future__ import annotations

from pathlib import Path

from tests.reliability.check import check
from tests.reliability.history import load, save
from tests.reliability.simulated import event_responses, simple_history


def test_a_saved_history_loads_back_and_checks_the_same(tmp_path: Path) -> None:
    _, history = simple_history("key")
    record = history.watches[0]
    del record.responses[event_responses(record)[1]]
    save(history, tmp_path / "history.pickle")
    loaded = load(tmp_path / "history.pickle")
    assert loaded.operations[0].request == history.operations[0].request
    assert check(loaded) == check(history) != []
