"""Hostile Watch streams side by side with etcd: random creates, cancels and progress
requests between single-key writes; the same control answers and events."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from tests.differential import Build, Pair
from tests.fuzzing import (
    DEADLINE,
    I64_MAX,
    I64_MIN,
    NAMES,
    Draw,
    Example,
    W,
    draw_range_end,
    draw_suffix,
    fewer,
)
from tests.servers import Etcd, GeminiServer, Stubs
from tests.waiting import eventually

pytestmark = pytest.mark.etcd


class Watches:
    """A Watch stream fed from a queue; everything received is kept in order."""

    def __init__(self, stubs: Stubs) -> None:
        self.requests: queue.Queue[W | None] = queue.Queue()
        self.received: queue.Queue[pb.WatchResponse] = queue.Queue()
        self.log: list[pb.WatchResponse] = []
        self.error: grpc.RpcError | None = None
        self.call = stubs.watch.Watch(iter(self.requests.get, None), timeout=120)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for resp in self.call:
                self.received.put(resp)
        except grpc.RpcError as err:
            self.error = err

    def created(self) -> int:
        return sum(1 for r in self.log if r.created)

    def wait_created(self, count: int) -> None:
        """Until ``count`` creates have been answered (each create gets one answer)."""

        def answered() -> bool:
            with contextlib.suppress(queue.Empty):
                while self.created() < count:
                    self.log.append(self.received.get(timeout=0.1))
            return self.created() >= count

        eventually(
            answered, lambda: f"an answer to each watch create: {self.log}", DEADLINE, interval=0
        )

    def drain(self, quiet: float) -> list[pb.WatchResponse]:
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            try:
                self.log.append(self.received.get(timeout=quiet))
            except queue.Empty:
                break
        return self.log

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()
        self.thread.join(5)


def _is_progress(resp: pb.WatchResponse) -> bool:
    # etcd 3.4 answers every progress request; 3.5 (and geminikv) only when synced
    return not (resp.created or resp.canceled or resp.events or resp.compact_revision)


def _watch_items(
    responses: list[pb.WatchResponse], to_rel: Callable[[int], int], canceled: set[int]
) -> dict[int | str, list[object]]:
    """Per watch ID: control responses and events, events flattened (a catching-up
    watcher may get its revisions in fewer, larger responses).

    For an ID the client canceled, only its creates and whether it ended: how many events
    arrive before the cancel, and whether etcd's (asynchronous) compaction cancel comes
    before it, are races in etcd itself."""
    items: dict[int | str, list[object]] = {}
    for resp in responses:
        if _is_progress(resp):
            continue
        if resp.created and resp.canceled and resp.watch_id == -1:
            # a rejected create (its own bucket: a client may name a watch -1 too)
            items.setdefault("rejected", []).append(resp.cancel_reason)
            continue
        out = items.setdefault(resp.watch_id, [])
        if resp.watch_id in canceled:
            if resp.created:
                out.append((resp.created, resp.canceled, resp.cancel_reason))
            elif resp.canceled and "ended" not in out:
                out.append("ended")
            continue
        if resp.created or resp.canceled or resp.compact_revision:
            compacted = resp.compact_revision != 0
            out.append((resp.created, resp.canceled, resp.cancel_reason, compacted))
        out.extend(Pair.normalise(("ok", event), to_rel)[1] for event in resp.events)
    return items


def _watch_create(draw: Draw, p: bytes, top: int) -> Build:
    key = p + draw_suffix(draw)
    end = draw_range_end(draw, p, key)
    start = draw(
        st.sampled_from(["zero", "rel", "rel", "future", "compacted", "compacted", "huge"])
    )
    rel = draw(st.integers(0, top))
    fields: dict[str, Any] = dict(
        key=key,
        range_end=end,
        prev_kv=draw(st.booleans()),
        fragment=draw(st.booleans()),
        progress_notify=draw(st.booleans()),
        filters=draw(st.lists(st.sampled_from([0, 1, 2, 7, -1]), max_size=3)),
        watch_id=draw(st.sampled_from([0, 0, 0, 1, 1, 2, -1, I64_MAX, I64_MIN])),
    )

    def build(rev: Callable[[int], int]) -> W:
        value = {
            "zero": 0,
            "rel": rev(rel),
            "future": rev(top + 1000),
            # below a never-compacted etcd's first revision (-1): compacted on both
            "compacted": -2,
            "huge": I64_MAX,
        }[start]
        create = pb.WatchCreateRequest(**fields, start_revision=value)
        return W(create_request=create)

    return build


@fewer(5)
@given(data=st.data())
def test_watch_requests_answered_as_etcd(
    etcd: Etcd, gemini: GeminiServer, data: st.DataObject
) -> None:
    draw = data.draw
    ex = Example(etcd, gemini, leases=False)
    streams = [Watches(ex.e), Watches(ex.g)]
    try:
        p, top, creates = ex.p, 8, 0
        canceled: set[int] = set()
        for i, name in enumerate(NAMES):  # some history to replay
            ex.call("Put", lambda rev, k=p + name, v=b"%d" % i: pb.PutRequest(key=k, value=v))
        for _ in range(draw(st.integers(1, 10), label="length")):
            kinds = ["create", "create", "create", "cancel", "progress", "put", "delete"]
            kind = draw(st.sampled_from(kinds))
            if kind in ("put", "delete"):
                # single-key writes: one revision per write on both servers, so watch
                # start revisions map exactly
                key = p + draw(st.sampled_from(NAMES))
                if kind == "put":
                    value = draw(st.sampled_from([b"", b"x", b"y"]))
                    ex.call("Put", lambda rev, k=key, v=value: pb.PutRequest(key=k, value=v))
                else:
                    ex.call("DeleteRange", lambda rev, k=key: pb.DeleteRangeRequest(key=k))
                continue
            build: Build
            if kind == "create":
                build = _watch_create(draw, p, top)
            elif kind == "cancel":
                watch_id = draw(st.sampled_from([0, 1, 2, 7, 12345, -1, I64_MAX]))
                canceled.add(watch_id)
                cancel = pb.WatchCancelRequest(watch_id=watch_id)
                build = lambda rev, c=cancel: W(cancel_request=c)  # noqa: E731
            else:
                build = lambda rev: W(progress_request=pb.WatchProgressRequest())  # noqa: E731
            streams[0].requests.put(build(ex.pair.etcd_rev))
            streams[1].requests.put(build(ex.pair.gk_rev))
            if kind == "create":  # as a client does: the next request after the answer
                creates += 1
                for s in streams:
                    s.wait_created(creates)
        # etcd catches up unsynced watchers every 100 ms: by the end of geminikv's drain
        g = _watch_items(streams[1].drain(0.4), ex.pair.gk_to_rel, canceled)
        e = _watch_items(streams[0].drain(0.15), ex.pair.etcd_to_rel, canceled)
        assert g == e, f"watch responses differ:\n etcd:     {e}\n geminikv: {g}"
        assert streams[0].error is None and streams[1].error is None
        # the stream still serves: a new watch is created
        streams[1].requests.put(W(create_request=pb.WatchCreateRequest(key=p, watch_id=2**62)))
        streams[1].wait_created(creates + 1)
    finally:
        for s in streams:
            s.close()
        ex.close()
