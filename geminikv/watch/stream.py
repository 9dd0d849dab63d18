"""One Watch gRPC stream: its watchers, and the ordered queue of responses to send.

Everything for a stream goes through one queue, so a watcher's ``created`` response
precedes its events, and a progress response follows every event queued before it.
A stream is its watchers' ``Sink`` and knows the hub only as a ``Watchable``
(watch/watcher.py).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from geminikv import errors
from geminikv.config import WATCH_MAX_QUEUED_EVENTS, WATCH_MAX_RESPONSE_BYTES
from geminikv.mvcc.events import Event
from geminikv.mvcc.ranges import range_end
from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.watch.events import to_pb
from geminikv.watch.watcher import Watchable, Watcher

_EVENTS = "events"
_PROGRESS = "progress"
_CONTROL = "control"


class _Item:
    __slots__ = ("count", "first_rev", "kind", "response", "watcher")

    def __init__(
        self,
        kind: str,
        response: pb.WatchResponse,
        watcher: Watcher | None = None,
        first_rev: int = 0,
        count: int = 0,
    ) -> None:
        self.kind = kind
        self.response = response
        self.watcher = watcher
        self.first_rev = first_rev
        self.count = count


class WatchStream:
    def __init__(
        self, hub: Watchable, fill_header: Callable[[pb.ResponseHeader, int], None]
    ) -> None:
        self.hub = hub
        self.fill_header = fill_header
        self.watchers: dict[int, Watcher] = {}
        self._next_id = 0
        self._queue: deque[_Item] = deque()
        self._queued: dict[Watcher, int] = {}
        self._ready = asyncio.Event()
        self.closed = False

    # -- requests ----------------------------------------------------------------------

    def handle(self, request: pb.WatchRequest) -> None:
        kind = request.WhichOneof("request_union")
        if kind == "create_request":
            self.create(request.create_request)
        elif kind == "cancel_request":
            self.cancel(request.cancel_request.watch_id)
        elif kind == "progress_request":
            self.request_progress()

    def create(self, req: pb.WatchCreateRequest) -> None:
        key = req.key or b"\x00"
        end = range_end(req.range_end)
        current = self.hub.revision
        if end is not None and end != b"" and key >= end:
            self._refuse(errors.WATCH_EMPTY_RANGE)
            return
        if self.hub.rebuilding():
            self._refuse(errors.Rewound.message)
            return
        watch_id = req.watch_id
        if watch_id == 0:
            while self._next_id in self.watchers:
                self._next_id += 1
            watch_id = self._next_id
            self._next_id += 1
        elif watch_id in self.watchers:
            self._refuse(errors.WATCH_DUPLICATE_ID)
            return
        start = self.hub.first_id(req.start_revision if req.start_revision != 0 else current + 1)
        filters = set(req.filters)
        watcher = Watcher(
            self,
            watch_id,
            key,
            end,
            start,
            req.prev_kv,
            pb.WatchCreateRequest.NOPUT in filters,
            pb.WatchCreateRequest.NODELETE in filters,
            req.fragment,
            req.progress_notify,
        )
        self.watchers[watch_id] = watcher
        self._control(self._response(watch_id, current, created=True))
        self.hub.add(watcher)

    def cancel(self, watch_id: int) -> None:
        watcher = self.watchers.pop(watch_id, None)
        if watcher is None:
            return
        self.hub.remove(watcher)
        self._drop(watcher)
        self._control(self._response(watch_id, self.hub.revision, canceled=True))

    def request_progress(self) -> None:
        """Answer only if every watcher has been given every event so far (etcd 3.5)."""
        if all(w.synced for w in self.watchers.values()):
            self._push(_Item(_PROGRESS, self._response(-1, self.hub.revision)))

    def progress_tick(self) -> None:
        """Periodic progress notification for synced watchers that got no events."""
        for watcher in self.watchers.values():
            if watcher.progress_notify and watcher.synced and not watcher.sent_since_tick:
                self._push(_Item(_PROGRESS, self._response(watcher.id, self.hub.revision)))
            watcher.sent_since_tick = False

    def close(self) -> None:
        self.closed = True
        for watcher in self.watchers.values():
            self.hub.remove(watcher)
        self.watchers.clear()
        self._queue.clear()
        self._ready.set()

    # -- called by the hub ------------------------------------------------------------

    def queue_events(
        self, watcher: Watcher, events: list[Event], header_rev: int, compact_rev: int
    ) -> None:
        if watcher.id not in self.watchers or self.watchers[watcher.id] is not watcher:
            return
        resp = self._response(watcher.id, header_rev)
        resp.events.extend(to_pb(e, watcher.prev_kv, compact_rev) for e in events)
        self._push(_Item(_EVENTS, resp, watcher, events[0].rid, len(events)))
        watcher.sent_since_tick = True
        queued = self._queued.get(watcher, 0) + len(events)
        self._queued[watcher] = queued
        if queued > WATCH_MAX_QUEUED_EVENTS:
            self._fall_behind(watcher)

    def cancel_with_reason(self, watcher: Watcher, reason: str) -> None:
        """Cancel, dropping what is queued for the watcher: nothing more reaches it."""
        self.watchers.pop(watcher.id, None)
        self.hub.remove(watcher)
        self._drop(watcher)
        self._control(self._response(watcher.id, 0, canceled=True, cancel_reason=reason))

    def cancel_compacted(self, watcher: Watcher, compact_rev: int) -> None:
        # Like etcd, the watch ID stays taken until the client cancels it (clientv3 does,
        # on this response): a create reusing it is a duplicate, the cancel is answered,
        # and, the watcher being unsynced, progress requests wait for that cancel.
        self.hub.remove(watcher)
        watcher.synced = False
        resp = pb.WatchResponse(watch_id=watcher.id, compact_revision=compact_rev, canceled=True)
        self.fill_header(resp.header, 0)
        self._control(resp)

    def pending(self) -> bool:
        return bool(self._queue)

    def backlogged(self, watcher: Watcher) -> bool:
        return self._queued.get(watcher, 0) > WATCH_MAX_QUEUED_EVENTS // 2

    # -- sending -----------------------------------------------------------------------

    async def responses(self) -> list[pb.WatchResponse]:
        """Wait for the next responses to send (empty once the stream is closed).

        Everything queued is taken at once; a watcher's queued event responses are
        merged into its first one (its events stay in order and only move earlier, past
        nothing they depend on: never past a progress response), so a slow reader catches
        up in few messages.
        """
        while not self._queue:
            if self.closed:
                return []
            self._ready.clear()
            await self._ready.wait()
        out: list[tuple[pb.WatchResponse, bool]] = []
        merged: dict[Watcher, pb.WatchResponse] = {}
        while self._queue:
            item = self._queue.popleft()
            watcher = item.watcher
            if watcher is None or item.kind != _EVENTS:
                out.append((item.response, False))
                if item.kind == _PROGRESS:
                    # events queued after a progress response stay after it: merged into
                    # an earlier response they would precede a revision below their own
                    merged.clear()
                continue
            self._queued.pop(watcher, None)
            first = merged.get(watcher)
            if first is None:
                merged[watcher] = item.response
                out.append((item.response, watcher.fragment))
            else:
                first.events.extend(item.response.events)
                first.header.revision = max(first.header.revision, item.response.header.revision)
        self.hub.wake()
        return [piece for resp, split in out for piece in (fragments(resp) if split else [resp])]

    # -- internals ---------------------------------------------------------------------

    def _response(self, watch_id: int, revision: int, **fields: object) -> pb.WatchResponse:
        resp = pb.WatchResponse(watch_id=watch_id, **fields)  # type: ignore[arg-type]
        self.fill_header(resp.header, revision)
        return resp

    def _refuse(self, reason: str) -> None:
        """Answer a create request with a watcher created and canceled at once."""
        self._control(
            self._response(-1, self.hub.revision, created=True, canceled=True, cancel_reason=reason)
        )

    def _control(self, resp: pb.WatchResponse) -> None:
        self._push(_Item(_CONTROL, resp))

    def _push(self, item: _Item) -> None:
        if self.closed:
            return
        self._queue.append(item)
        self._ready.set()

    def _drop(self, watcher: Watcher) -> int | None:
        """Remove a watcher's unsent events; returns the first dropped revision."""
        first: int | None = None
        kept: deque[_Item] = deque()
        for item in self._queue:
            if item.watcher is watcher and item.kind == _EVENTS:
                first = item.first_rev if first is None else min(first, item.first_rev)
            else:
                kept.append(item)
        self._queue = kept
        self._queued.pop(watcher, None)
        return first

    def _fall_behind(self, watcher: Watcher) -> None:
        """The client is not reading: forget what is queued and re-read it later."""
        first = self._drop(watcher)
        if first is not None:
            watcher.next_rev = min(watcher.next_rev, first)
        # A queued progress response would now claim events that were taken back.
        self._queue = deque(i for i in self._queue if i.kind != _PROGRESS)
        self.hub.demote(watcher)


def fragments(resp: pb.WatchResponse) -> list[pb.WatchResponse]:
    """etcd's sendFragments: split a large response between events, all but the last
    marked ``fragment``."""
    if resp.ByteSize() < WATCH_MAX_RESPONSE_BYTES or len(resp.events) < 2:
        return [resp]
    out: list[pb.WatchResponse] = []
    events = list(resp.events)
    base = pb.WatchResponse()
    base.CopyFrom(resp)
    del base.events[:]
    i = 0
    while i < len(events):
        cur = pb.WatchResponse()
        cur.CopyFrom(base)
        cur.fragment = True
        while i < len(events):
            cur.events.append(events[i])
            if len(cur.events) > 1 and cur.ByteSize() >= WATCH_MAX_RESPONSE_BYTES:
                del cur.events[-1]
                break
            i += 1
        if i == len(events):
            cur.fragment = False
        out.append(cur)
    return out
