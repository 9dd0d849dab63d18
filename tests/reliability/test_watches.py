"""The watch checker (watches.py) on synthetic histories: each injected watch bug (a skipped,
duplicated or reordered event, a wrong prev_kv, a broken bookmark or resume, a cancel
without reason) is reported. No servers."""

from __future__ import annotations

import pytest

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from tests.reliability.check import check
from tests.reliability.history import WatchRecord
from tests.reliability.simulated import MODES, event_responses, only, simple_history


@pytest.mark.parametrize("mode", MODES)
def test_skipped_watch_event(mode: str) -> None:
    _, history = simple_history(mode)
    record = history.watches[0]
    dropped = event_responses(record)[1]
    del record.responses[dropped]
    violations = check(history)
    assert only(violations, "watch not reliable", "watch #0", "missed 1 events")


@pytest.mark.parametrize("mode", MODES)
def test_duplicated_watch_event(mode: str) -> None:
    _, history = simple_history(mode)
    record = history.watches[0]
    i = event_responses(record)[2]
    record.responses.insert(i + 1, record.responses[i])
    assert only(check(history), "watch not unique", "watch #0", "twice")


@pytest.mark.parametrize("mode", MODES)
def test_watch_events_out_of_order(mode: str) -> None:
    _, history = simple_history(mode)
    record = history.watches[0]
    i, j = event_responses(record)[1:3]
    record.responses[i], record.responses[j] = record.responses[j], record.responses[i]
    violations = check(history)
    assert only(violations, "watch not ordered", "watch #0")


@pytest.mark.parametrize("mode", MODES)
def test_wrong_prev_kv_in_a_watch(mode: str) -> None:
    _, history = simple_history(mode)
    record = history.watches[0]
    event = next(e for _, r in record.responses for e in r.events if e.HasField("prev_kv"))
    event.prev_kv.value = b"wrong"
    violations = check(history)
    assert only(violations, "wrong prev_kv", "watch #0", "=wrong", "expected /t/a=a1")


@pytest.mark.parametrize("mode", MODES)
def test_progress_notification_followed_by_older_event(mode: str) -> None:
    _, history = simple_history(mode)
    record = history.watches[0]
    i = event_responses(record)[2]
    revision = record.responses[i][1].events[0].kv.mod_revision
    note = pb.WatchResponse()
    note.header.revision = revision
    record.responses.insert(i, (0, note))
    violations = check(history)
    assert only(violations, "not bookmarkable", "watch #0", f"at revision {revision}")


@pytest.mark.parametrize("mode", MODES)
def test_resumed_watch(mode: str) -> None:
    sim, history = simple_history(mode)
    broken = history.watches[0]
    cut = event_responses(broken)[2] + 1
    broken.responses, broken.ended = broken.responses[:cut], "broken"
    seen = broken.responses[-1][1].events[-1].kv.mod_revision
    for start in (seen + 1, seen + 2):
        resumed = WatchRecord(5, pb.WatchCreateRequest(), resumed=True)
        resumed.request.CopyFrom(broken.request)
        resumed.request.start_revision = start
        sim.deliver(resumed, sim.revision, 0)
        history.watches[1:] = [resumed]
        violations = check(history)
        if start == seen + 1:
            assert violations == []
        else:
            assert only(violations, "not resumable", "watch #1", f"reached only revision {seen}")


@pytest.mark.parametrize("mode", MODES)
def test_watch_canceled_without_reason(mode: str) -> None:
    _, history = simple_history(mode)
    record = history.watches[0]
    canceled = pb.WatchResponse(canceled=True)
    record.responses.append((0, canceled))
    record.ended = "canceled"
    assert only(check(history), "watch canceled without reason", "watch #0")
    canceled.cancel_reason = "etcdserver: mvcc: required revision has been compacted"
    assert check(history) == []
