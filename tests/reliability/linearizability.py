"""Linearizability of a recorded history, checked the way etcd's robustness tests make it
tractable: writes are totally ordered by revision, so the history's own record of every
change (``History.complete``) fixes the order, and every change must be explained by an
operation.

Walking the changes in revision order, the model's state is always the state at the
current revision. The next change(s) must be exactly what some write yields on that state:

1. the acknowledged write whose header revision ends them (or whose put value they
   carry) and whose response matches the model's, else
2. a not yet used write of unknown outcome (it may or may not have been applied).

Anything else is reported: an unexplained change (invented data), an unknown write seen
only partly (not atomic) or twice, a failed write that was applied, an acknowledged write
whose response differs from the model's. Operations that change nothing (reads, failed
compares, deletes of nothing) are checked against the state at their revision while
replaying; an acknowledged write still unexplained when the replay passes its header
revision must change nothing there, or it is a lost write. Finally the operations, placed
in the revision order, are checked against real time (``realtime``).
"""

from __future__ import annotations

import bisect
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from tests.reliability import describe
from tests.reliability.convert import result_of
from tests.reliability.history import DEFINITE_FAILURES, History, Operation
from tests.reliability.model import (
    DELETE,
    PUT,
    Change,
    Outcome,
    Store,
    can_write,
    evaluate,
    may_delete,
    put_values,
)
from tests.reliability.realtime import Placed, check_real_time
from tests.reliability.timeline import Timeline, build_timeline

UNUSED, USED, MISSING = "unused", "used", "missing"
MODELLED = frozenset({"range", "put", "delete", "txn", "lease_revoke"})

# how well an operation explains the next changes (lower is better)
EXACT_ACK = 0  # acknowledged, and its response matches
EXACT_UNKNOWN = 1
EXACT_WRONG_RESPONSE = 2
EXACT_REORDERED = 3  # acknowledged write reported lost at its revision, seen later
EXACT_DUPLICATE = 4  # already explained other changes
EXACT_FAILED = 5  # definite failure
PARTIAL = 6
PARTIAL_OTHER = 7


@dataclass(slots=True)
class Match:
    rank: int
    index: int  # into History.operations
    outcome: Outcome
    matched: int  # how many leading changes of the outcome the history has
    # the response names what changed (a lease revoke's does not: a revoke batched right
    # after a delete of its key deletes nothing, and both answer at the delete's revision)
    evidence: bool = True

    def better(self, other: Match) -> bool:
        """A better rank; among acknowledged writes, one whose response shows the change;
        among exact unknown writes, the one making fewer changes (leaving the rest to
        other writes); among partial ones, the one matching more."""
        if self.rank != other.rank:
            return self.rank < other.rank
        if self.rank == EXACT_ACK:
            return self.evidence and not other.evidence
        if self.rank >= PARTIAL:
            return self.matched > other.matched
        return len(self.outcome.changes) < len(other.outcome.changes)

    def final(self, mode: str) -> bool:
        """Nothing can be better."""
        if self.rank == EXACT_UNKNOWN:
            return mode == "txn" or len(self.outcome.changes) == 1
        return self.rank == EXACT_ACK and self.evidence


class Checker:
    def __init__(self, history: History, timeline: Timeline) -> None:
        self.ops = history.operations
        self.mode = history.revisions
        self.changes = timeline.changes
        self.revisions = timeline.revisions
        self.store = Store()
        self.store.revision = history.base_revision
        self.violations: list[str] = []
        self.status = [UNUSED] * len(self.ops)
        self.placed: dict[int, Placed] = {}
        self.revoked: dict[int, int] = {}  # lease -> revision by which it was revoked
        # "key" mode: revision -> (write, its first and last revision) for the revisions
        # inside a write of several changes, which no operation may see as current
        self.inside: dict[int, tuple[int, int, int]] = {}
        self.index_operations()
        # index of the first PUT change at or after each change
        self.next_put = [len(self.changes)] * (len(self.changes) + 1)
        for k in range(len(self.changes) - 1, -1, -1):
            put = self.changes[k].type == PUT
            self.next_put[k] = k if put else self.next_put[k + 1]

    def index_operations(self) -> None:
        self.by_value: dict[bytes, list[int]] = {}  # put value -> writes that put it
        ack_writes: list[tuple[int, int]] = []  # (header revision, op)
        deleters: list[tuple[int, int]] = []  # (call, op) of unacknowledged deleters
        reached: list[tuple[int, int]] = []  # (header revision, return) of acknowledged
        pending: list[tuple[int, int]] = []  # (revision whose state to check at, op)
        for i, op in enumerate(self.ops):
            writes = can_write(op.kind, op.request)
            if writes:
                for value in put_values(op.kind, op.request):
                    self.by_value.setdefault(value, []).append(i)
            if op.response is None:
                if writes and op.kind in ("delete", "txn", "lease_revoke"):
                    deleters.append((op.call, i))
                continue
            if op.kind not in MODELLED:
                continue
            header = op.response.header.revision
            reached.append((header, op.ret or 0))
            if writes:
                ack_writes.append((header, i))
            if op.kind == "range" and op.request.revision > 0:
                pending.append((op.request.revision, i))
            else:
                pending.append((header, i))
        self.ack_writes = sorted(ack_writes)
        self.deleters = sorted(deleters, reverse=True)
        self.pending = sorted(pending)
        self.next_pending = 0
        # the earliest return among the acknowledged operations from the k-th in header
        # revision order on: no write at that revision can have been called later
        self.reached = sorted(reached)
        self.reached_min_ret = [0] * len(self.reached) + [sys.maxsize]
        for k in range(len(self.reached) - 1, -1, -1):
            self.reached_min_ret[k] = min(self.reached[k][1], self.reached_min_ret[k + 1])

    def d(self, index: int) -> str:
        return describe.op(self.ops[index])

    def report(self, text: str) -> None:
        self.violations.append(text)

    # -- the replay --------------------------------------------------------------------------

    def run(self) -> list[str]:
        changes = self.changes
        i = 0
        while i < len(changes):
            self.check_pending(changes[i].revision)
            n = self.explain(i)
            for k in range(i, i + n):
                self.check_pending(changes[k].revision)
                self.apply(changes[k])
            i += n
        self.check_pending(None)
        self.check_leases()
        placed = sorted(self.placed.values(), key=lambda p: p.index)
        self.violations.extend(check_real_time(placed, self.d))
        return self.violations

    def apply(self, change: Change) -> None:
        lease = change.kv.lease
        revoked = self.revoked.get(lease) if lease else None
        if change.type == PUT and revoked is not None and change.revision > revoked:
            self.report(
                f"lease: {describe.change(change)} attaches the key to lease {lease}, "
                f"revoked by revision {revoked}"
            )
        self.store.apply(change)

    # -- explaining changes ------------------------------------------------------------------

    def group_end(self, i: int) -> int:
        """End of the changes one write can make starting at change i: in "txn" mode the
        changes of its revision; in "key" mode any number of consecutive ones."""
        if self.mode == "txn":
            return bisect.bisect_right(self.revisions, self.changes[i].revision)
        return len(self.changes)

    def explain(self, i: int) -> int:
        """Find the write that made the changes starting at i; returns how many it made."""
        end = self.group_end(i)
        best: Match | None = None
        seen: set[int] = set()
        for tier in (self.likely_writers, self.possible_deleters):
            for index in tier(i, end):
                if index in seen:
                    continue
                seen.add(index)
                match = self.try_op(index, i, end)
                if match is not None and (best is None or match.better(best)):
                    best = match
                if best is not None and best.final(self.mode):
                    break
            if best is not None and best.rank <= EXACT_UNKNOWN:
                break
        if best is None:
            self.report_unexplained(i, end)
            return 1 if self.mode == "key" else end - i
        return self.accept(best, i, end)

    def likely_writers(self, i: int, end: int) -> list[int]:
        """Writes that put the values of the next changes, then acknowledged writes whose
        header revision could end them."""
        changes = self.changes
        r = changes[i].revision
        if self.mode == "txn":
            puts = [c for c in changes[i:end] if c.type == PUT]
            hi = r
        else:
            k = self.next_put[i]
            puts = [changes[k]] if k < len(changes) else []
            hi = changes[k].revision - 1 if k < len(changes) else changes[-1].revision
        out = [index for c in puts for index in self.by_value.get(c.kv.value, ())]
        acks = self.ack_writes
        k = bisect.bisect_left(acks, (r, -1))
        while k < len(acks) and acks[k][0] <= hi:
            if self.status[acks[k][1]] == UNUSED:
                out.append(acks[k][1])
            k += 1
        return out

    def possible_deleters(self, i: int, end: int) -> Iterator[int]:
        """Unacknowledged writes that could delete the first deleted key, latest called
        first; not those called after an operation that had reached this revision
        returned (real time rules them out)."""
        changes = self.changes
        group = changes[i:end] if self.mode == "txn" else changes[i : i + 1]
        deleted = next((c.key for c in group if c.type == DELETE), None)
        if deleted is None:
            return
        r = changes[i].revision
        called_by = self.reached_min_ret[bisect.bisect_left(self.reached, (r, -1))]
        for call, index in self.deleters:  # sorted by call, latest first
            if call > called_by or self.status[index] != UNUSED:
                continue
            op = self.ops[index]
            if may_delete(op.kind, op.request, deleted, self.store):
                yield index

    def try_op(self, index: int, i: int, end: int) -> Match | None:
        op = self.ops[index]
        start = self.changes[i].revision
        outcome = evaluate(self.store, op.kind, op.request, start, self.mode)
        made = outcome.changes
        n = 0
        while n < len(made) and i + n < end and made[n] == self.changes[i + n]:
            n += 1
        if n == 0:
            return None
        exact = n == len(made) and (self.mode == "key" or i + n == end)
        status = self.status[index]
        if not exact:
            rank = PARTIAL if status == UNUSED and not failed(op) else PARTIAL_OTHER
        elif failed(op):
            rank = EXACT_FAILED
        elif status == USED:
            rank = EXACT_DUPLICATE
        elif status == MISSING:
            rank = EXACT_REORDERED
        elif op.response is None:
            rank = EXACT_UNKNOWN
        elif response_matches(op, outcome, made[-1].revision):
            rank = EXACT_ACK
        else:
            rank = EXACT_WRONG_RESPONSE
        return Match(rank, index, outcome, n, op.kind != "lease_revoke")

    def accept(self, m: Match, i: int, end: int) -> int:
        op = self.ops[m.index]
        made = m.outcome.changes
        where = f"revision {made[0].revision}"
        if m.rank == EXACT_WRONG_RESPONSE:
            self.report(
                f"wrong response: {self.d(m.index)} made {describe.changes(made)}, but its "
                f"response differs: it {response_mismatch(op, m.outcome, made[-1].revision)}"
            )
        elif m.rank == EXACT_REORDERED:
            self.report(
                f"reordered write: {self.d(m.index)} appears in the history at {where}, "
                f"not at its header revision"
            )
        elif m.rank == EXACT_DUPLICATE:
            self.report(
                f"duplicate write: {self.d(m.index)} applied again at {where}: "
                f"{describe.changes(made)}"
            )
        elif m.rank == EXACT_FAILED:
            self.report(
                f"failed write applied: {self.d(m.index)} failed definitely, but the "
                f"history has its changes {describe.changes(made)}"
            )
        elif m.rank >= PARTIAL:
            seen = self.changes[i : i + m.matched]
            kind = "unknown-outcome" if op.unknown else "acknowledged" if op.response else "failed"
            self.report(
                f"partial write (not atomic): {kind} {self.d(m.index)} appears only partly "
                f"at {where}: the history has {describe.changes(seen)} of the model's "
                f"{describe.changes(made)}"
            )
        consumed = m.matched if self.mode == "key" else end - i
        if self.mode == "key":
            span = (m.index, self.changes[i].revision, self.changes[i + consumed - 1].revision)
            for k in range(i, i + consumed - 1):
                self.inside[self.changes[k].revision] = span
        if self.status[m.index] == UNUSED or m.rank == EXACT_REORDERED:
            self.status[m.index] = USED
            if not failed(op):
                last = self.changes[i + consumed - 1].revision
                self.place(m.index, made[0].revision, last, writes=True)
        if op.kind == "lease_revoke":
            self.revoked.setdefault(op.request.ID, self.changes[i + consumed - 1].revision)
        return consumed

    def report_unexplained(self, i: int, end: int) -> None:
        change = self.changes[i]
        text = (
            f"unexplained change: {describe.change(change)} is not the effect of any "
            f"operation on the state at revision {change.revision - 1}"
        )
        if self.mode == "txn" and end - i > 1:
            others = describe.changes(self.changes[i + 1 : end])
            text += f" (with the other changes of its revision: {others})"
        owners = self.by_value.get(change.kv.value, []) if change.type == PUT else []
        for index in owners[:1]:
            op = self.ops[index]
            outcome = evaluate(self.store, op.kind, op.request, change.revision, self.mode)
            text += (
                f"; its value is written by {self.d(index)}, which would make "
                f"{describe.changes(outcome.changes)}"
            )
        self.report(text)

    # -- operations that change nothing --------------------------------------------------------

    def check_pending(self, before: int | None) -> None:
        """Check the operations that read the state at a revision < ``before`` (None: all);
        the store is at that state."""
        pending = self.pending
        while self.next_pending < len(pending) and (
            before is None or pending[self.next_pending][0] < before
        ):
            revision, index = pending[self.next_pending]
            self.next_pending += 1
            if self.ops[index].kind == "range":
                self.check_read(index, revision)
            elif self.status[index] == UNUSED:
                self.check_unchanging_write(index, revision)
            self.check_not_inside(index)

    def check_not_inside(self, index: int) -> None:
        """An operation's header revision is never inside another write ("key" mode)."""
        header = header_of(self.ops[index])
        if header in self.inside and self.status[index] != MISSING:
            write, first, last = self.inside[header]
            if write != index:
                self.report(
                    f"not atomic: {self.d(index)} has header revision {header}, inside "
                    f"the write of {self.d(write)} (revisions {first}-{last})"
                )

    def check_read(self, index: int, revision: int) -> None:
        op = self.ops[index]
        got = result_of("range", op.response)
        want = self.store.read(op.request)
        header = header_of(op)
        if got != want:
            self.report(
                f"wrong read: {self.d(index)} on the state at revision {revision} "
                f"{describe.mismatch(got, want)}"
            )
        if op.request.revision > 0 and header < op.request.revision:
            self.report(
                f"wrong read: {self.d(index)} asked for revision {op.request.revision} but "
                f"its header revision is {header}"
            )
        self.place(index, header, header, writes=False, stale_ok=op.request.serializable)

    def check_unchanging_write(self, index: int, revision: int) -> None:
        op = self.ops[index]
        outcome = evaluate(self.store, op.kind, op.request, revision + 1, self.mode)
        if outcome.changes:
            # as if it had ended at its header revision
            first = revision - len(outcome.changes) + 1 if self.mode == "key" else revision
            outcome = evaluate(self.store, op.kind, op.request, first, self.mode)
            self.status[index] = MISSING
            self.report(
                f"lost write: {self.d(index)} was acknowledged but is not in the history "
                f"at revision {revision}: on that state the model would make "
                f"{describe.changes(outcome.changes)}"
            )
            return
        self.status[index] = USED
        got = result_of(op.kind, op.response)
        if got != outcome.result:
            self.report(
                f"wrong response: {self.d(index)} changed nothing at revision {revision}, "
                f"but it {describe.mismatch(got, outcome.result)}"
            )
        if op.kind == "lease_revoke":
            self.revoked.setdefault(op.request.ID, revision)
        self.place(index, revision, revision, writes=False)

    # -- leases and real time ----------------------------------------------------------------

    def check_leases(self) -> None:
        granted: dict[int, int] = {}
        for index, op in enumerate(self.ops):
            if op.kind != "lease_grant" or op.response is None:
                continue
            lease = op.response.ID
            if lease <= 0:
                self.report(f"lease: {self.d(index)} granted lease ID {lease}")
            elif lease in granted:
                self.report(
                    f"lease: {self.d(index)} granted lease {lease}, already granted to "
                    f"{self.d(granted[lease])}"
                )
            else:
                granted[lease] = index

    def place(
        self, index: int, first: int, last: int, writes: bool, stale_ok: bool = False
    ) -> None:
        op = self.ops[index]
        self.placed[index] = Placed(index, op.call, op.ret, first, last, writes, stale_ok)


def header_of(op: Operation) -> int:
    """The header revision of an acknowledged operation."""
    assert op.response is not None
    return int(op.response.header.revision)


def failed(op: Operation) -> bool:
    """A definite failure: certainly not applied."""
    return op.response is None and op.error in DEFINITE_FAILURES


def response_matches(op: Operation, outcome: Outcome, last_revision: int) -> bool:
    return header_of(op) == last_revision and (result_of(op.kind, op.response) == outcome.result)


def response_mismatch(op: Operation, outcome: Outcome, last_revision: int) -> str:
    header = header_of(op)
    if header != last_revision:
        return f"has header revision {header}, the model {last_revision}"
    return describe.mismatch(result_of(op.kind, op.response), outcome.result)


def check_linearizability(history: History, timeline: Timeline | None = None) -> list[str]:
    """Violations of linearizability (empty: the operations are explained by the history's
    record of changes, in an order consistent with real time)."""
    return Checker(history, timeline or build_timeline(history)).run()
