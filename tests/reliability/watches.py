"""Watch guarantees, each watcher checked against the history's record of every change.

etcd's guarantees (api_guarantees.md; etcd's robustness ``validate/watch.go``):
ordered, unique, reliable (no gaps), atomic (a revision's events in one response, "txn"
mode), bookmarkable (no event at or below a progress notification's revision after it),
prev_kv (the key's state before the event, only when asked), matching (an event equals
the history's), resumable (a resumed watcher starts where the broken one stopped) and a
server-side cancel carries its reason.
"""

from __future__ import annotations

from typing import Any

from tests.reliability import describe
from tests.reliability.convert import change_of, prev_of
from tests.reliability.history import History, WatchRecord
from tests.reliability.model import KV, PUT, Change, in_range
from tests.reliability.timeline import Timeline, build_timeline

NOPUT, NODELETE = 0, 1
MAX_LISTED = 3  # events listed in one violation


class Order:
    """Ordered and unique, event by event."""

    def __init__(self, mode: str, where: str, violations: list[str]) -> None:
        self.per_key = mode == "key"
        self.where = where
        self.violations = violations
        self.seen: set[tuple[int, bytes]] = set()
        self.last = 0

    def add(self, change: Change) -> bool:
        """Record an event; False (and a violation) if it was received before."""
        ident = (change.revision, change.key)
        if ident in self.seen:
            self.violations.append(
                f"watch not unique: {self.where} received {describe.change(change)} twice"
            )
            return False
        self.seen.add(ident)
        if change.revision < self.last or (self.per_key and change.revision == self.last):
            self.violations.append(
                f"watch not ordered: {self.where} received {describe.change(change)} after "
                f"an event at revision {self.last}"
            )
        self.last = max(self.last, change.revision)
        return True


def watch_range(record: WatchRecord) -> tuple[bytes, bytes]:
    """The watched range as etcd reads it: an empty key is ``"\\0"``."""
    return record.request.key or b"\0", record.request.range_end


def wanted(record: WatchRecord, change: Change) -> bool:
    """Whether the watcher should receive this change (its range and filters)."""
    filters = set(record.request.filters)
    if (NOPUT in filters and change.type == PUT) or (NODELETE in filters and change.type != PUT):
        return False
    return in_range(change.key, *watch_range(record))


def start_revision(record: WatchRecord) -> int | None:
    """The first revision the watcher asked for (0: after its created response's header)."""
    if record.request.start_revision > 0:
        return int(record.request.start_revision)
    for _, resp in record.responses:
        if resp.created:
            return int(resp.header.revision) + 1
    return None


def reached(record: WatchRecord) -> int:
    """The last revision the watcher is known to have caught up to: its last event or
    progress notification, whichever is higher."""
    last = 0
    for _, resp in record.responses:
        if resp.events:
            last = max(last, *(ev.kv.mod_revision for ev in resp.events))
        elif is_progress(resp):
            last = max(last, resp.header.revision)
    return last


def is_progress(resp: Any) -> bool:
    """A progress notification: no events, neither created nor canceled."""
    return not resp.events and not resp.created and not resp.canceled


class WatchCheck:
    def __init__(self, record: WatchRecord, where: str, timeline: Timeline, mode: str) -> None:
        self.record = record
        self.where = where
        self.timeline = timeline
        self.mode = mode
        self.violations: list[str] = []

    def report(self, text: str) -> None:
        self.violations.append(text)

    def run(self) -> list[str]:
        record = self.record
        if not record.responses:
            return self.violations  # broke before it was created
        created = record.responses[0][1]
        if not created.created:
            self.report(f"watch: {self.where} received a response before its created response")
        self.check_cancel()
        if created.created and created.canceled:
            return self.violations  # refused at creation: nothing else to check
        start = start_revision(record) or 1
        received = self.check_events(start)
        self.check_reliable(start, received)
        return self.violations

    def check_cancel(self) -> None:
        if self.record.ended != "canceled":
            return
        for _, resp in self.record.responses:
            if resp.canceled and not resp.cancel_reason and not resp.compact_revision:
                self.report(
                    f"watch canceled without reason: {self.where} was canceled by the server "
                    f"(header revision {resp.header.revision}) with neither cancel_reason nor "
                    f"compact_revision"
                )

    def check_events(self, start: int) -> set[tuple[int, bytes]]:
        """Ordered, unique, atomic, bookmarkable, matching and prev_kv; returns the events
        received, as (revision, key)."""
        order = Order(self.mode, self.where, self.violations)
        progress = 0
        response_of: dict[int, int] = {}  # revision -> response (fragments joined)
        piece = 0
        for n, (_, resp) in enumerate(self.record.responses):
            if is_progress(resp):
                progress = max(progress, resp.header.revision)
            for event in resp.events:
                change = change_of(event)
                if not order.add(change):
                    continue
                if change.revision <= progress:
                    self.report(
                        f"watch not bookmarkable: {self.where} received "
                        f"{describe.change(change)} after a progress notification at "
                        f"revision {progress}"
                    )
                if self.mode == "txn" and response_of.setdefault(change.revision, piece) != piece:
                    self.report(
                        f"watch not atomic: {self.where} received the events of revision "
                        f"{change.revision} in more than one response"
                    )
                if change.revision < start or not wanted(self.record, change):
                    self.report(
                        f"watch event not asked for: {self.where} received "
                        f"{describe.change(change)}, outside its range, filters or start "
                        f"revision {start}"
                    )
                self.check_match(change, prev_of(event))
            if not resp.fragment:
                piece = n + 1
        return order.seen

    def check_match(self, change: Change, prev: KV | None) -> None:
        k = self.timeline.find(change.revision, change.key)
        if k is None:
            self.report(
                f"watch event not in history: {self.where} received {describe.change(change)}, "
                f"which the history does not have"
            )
            return
        if self.timeline.changes[k] != change:
            self.report(
                f"watch event differs: {self.where} received {describe.change(change)}, the "
                f"history has {describe.change(self.timeline.changes[k])}"
            )
        asked = self.record.request.prev_kv
        want = self.timeline.prevs[k] if asked else None
        if prev != want:
            self.report(wrong_prev(self.where, change, prev, want, asked))

    def check_reliable(self, start: int, received: set[tuple[int, bytes]]) -> None:
        last = reached(self.record)
        changes = self.timeline.changes
        missed = [
            changes[k]
            for k in self.timeline.between(start, last)
            if wanted(self.record, changes[k])
            and (changes[k].revision, changes[k].key) not in received
        ]
        if missed:
            more = f" and {len(missed) - MAX_LISTED} more" if len(missed) > MAX_LISTED else ""
            self.report(
                f"watch not reliable: {self.where} missed {len(missed)} events between "
                f"revision {start} and revision {last} it reached: "
                f"{describe.changes(missed[:MAX_LISTED])}{more}"
            )


def check_complete(history: History, timeline: Timeline) -> list[str]:
    """The history's record of changes itself: ordered, unique, after base_revision, and
    its prev_kv (when asked for) consistent with its own events."""
    if history.complete is None:
        return ["complete record missing: the history has no record of every change"]
    violations: list[str] = []
    where = "the complete record"
    order = Order(history.revisions, where, violations)
    with_prev = history.complete.request.prev_kv
    for _, resp in history.complete.responses:
        for event in resp.events:
            change = change_of(event)
            if not order.add(change):
                continue
            if change.revision <= history.base_revision:
                violations.append(
                    f"complete record: {describe.change(change)} is not after the base "
                    f"revision {history.base_revision}"
                )
            k = timeline.find(change.revision, change.key)
            want = timeline.prevs[k] if with_prev and k is not None else None
            if prev_of(event) != want:
                violations.append(wrong_prev(where, change, prev_of(event), want, with_prev))
    return violations


def wrong_prev(where: str, change: Change, got: KV | None, want: KV | None, asked: bool) -> str:
    note = "" if asked else " (prev_kv not requested)"
    return (
        f"wrong prev_kv: {where} received {describe.change(change)} with prev_kv "
        f"{describe.kv(got)}, expected {describe.kv(want)}{note}"
    )


def check_resumes(history: History, timeline: Timeline) -> list[str]:
    """A resumed watcher must start right after the last revision the watcher it resumes
    (the previous record of that client on the same range) reached."""
    violations: list[str] = []
    records = history.watches
    for n, record in enumerate(records):
        if not record.resumed:
            continue
        where = describe.watch(record, n)
        before = [
            i
            for i in range(n)
            if records[i].client == record.client
            and watch_range(records[i]) == watch_range(record)
            and list(records[i].request.filters) == list(record.request.filters)
            and records[i].request.prev_kv == record.request.prev_kv
        ]
        if not before:
            violations.append(f"watch not resumable: {where} resumes no earlier watcher")
            continue
        previous = records[before[-1]]
        until = max(reached(previous), (start_revision(previous) or 1) - 1)
        start = start_revision(record)
        if start is None or start <= until + 1:
            continue
        skipped = [
            timeline.changes[k]
            for k in timeline.between(until + 1, start - 1)
            if wanted(record, timeline.changes[k])
        ]
        if skipped:
            violations.append(
                f"watch not resumable: {where} starts at revision {start}, but "
                f"{describe.watch(previous, before[-1])} reached only revision {until}: "
                f"{len(skipped)} events skipped, first {describe.change(skipped[0])}"
            )
    return violations


def check_watches(history: History, timeline: Timeline | None = None) -> list[str]:
    """Violations of the watch guarantees, for the complete record and every watcher."""
    timeline = timeline or build_timeline(history)
    violations = check_complete(history, timeline)
    for n, record in enumerate(history.watches):
        where = describe.watch(record, n)
        violations.extend(WatchCheck(record, where, timeline, history.revisions).run())
    violations.extend(check_resumes(history, timeline))
    return violations
