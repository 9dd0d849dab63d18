"""kube-apiserver's watch pattern, checked event by event against the writes' results.

List at a revision in pages, watch from rv+1 with prev_kv and progress_notify on one
shared stream, RequestProgress every 100 ms, and concurrent creates, guaranteed updates
and deletes with conflicts.
"""

from __future__ import annotations

import random
import threading
import time

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.proto.etcdserverpb import rpc_pb2_grpc
from geminikv.proto.mvccpb import kv_pb2
from tests.servers import GeminiServer
from tests.waiting import eventually
from tests.watching import WatchClient

C = pb.Compare


def _paged_list(kv: rpc_pb2_grpc.KVStub, prefix: bytes) -> tuple[int, dict[bytes, kv_pb2.KeyValue]]:
    end = prefix[:-1] + bytes([prefix[-1] + 1])
    first = kv.Range(pb.RangeRequest(key=prefix, range_end=end, limit=7))
    rv = first.header.revision
    state = {k.key: k for k in first.kvs}
    more, last = first.more, first.kvs[-1].key if first.kvs else prefix
    while more:
        page = kv.Range(pb.RangeRequest(key=last + b"\x00", range_end=end, limit=7, revision=rv))
        assert page.count == first.count - len(state)  # remaining items, as the apiserver uses
        state.update((k.key, k) for k in page.kvs)
        more, last = page.more, page.kvs[-1].key
    assert len(state) == first.count
    return rv, state


def test_apiserver_watch_pattern(gemini: GeminiServer, prefix: bytes) -> None:
    kv = gemini.stubs().kv
    pods = prefix + b"pods/"
    for i in range(40):
        kv.Put(pb.PutRequest(key=pods + b"p%02d" % i, value=b"initial-%d" % i))
    rv, listed = _paged_list(kv, pods)

    watch = WatchClient(gemini.stubs(), metadata=(("hasleader", "true"), ("source", "cache")))
    main = watch.create(
        key=pods,
        range_end=pods[:-1] + b"0",
        start_revision=rv + 1,
        prev_kv=True,
        progress_notify=True,
    )
    other = watch.create(
        key=prefix + b"nodes/",
        range_end=prefix + b"nodes0",
        start_revision=rv + 1,
        prev_kv=True,
        progress_notify=True,
    )
    assert (main.watch_id, other.watch_id) == (0, 1)

    writes: list[tuple[int, str, bytes, bytes]] = []  # (revision, op, key, value)
    lock = threading.Lock()
    stop = threading.Event()

    def writer(seed: int) -> None:
        rnd = random.Random(seed)
        stubs = gemini.stubs()
        while not stop.is_set():
            key = pods + b"p%02d" % rnd.randrange(50)
            current = stubs.kv.Range(pb.RangeRequest(key=key)).kvs
            mod = current[0].mod_revision if current else 0
            value = b"w%d-%d" % (seed, rnd.randrange(10**6))
            if current and rnd.random() < 0.25:
                op = pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=key))
                kind = "delete"
            else:
                op = pb.RequestOp(request_put=pb.PutRequest(key=key, value=value))
                kind = "put"
            resp = stubs.kv.Txn(
                pb.TxnRequest(
                    compare=[C(key=key, target=C.MOD, result=C.EQUAL, mod_revision=mod)],
                    success=[op],
                    failure=[pb.RequestOp(request_range=pb.RangeRequest(key=key))],
                )
            )
            if resp.succeeded:
                with lock:
                    writes.append((resp.header.revision, kind, key, value))
        stubs.close()

    def progress() -> None:
        while not stop.is_set():
            watch.send(progress_request=pb.WatchProgressRequest())
            time.sleep(0.1)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    threads.append(threading.Thread(target=progress))
    for t in threads:
        t.start()
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join()
    last = max(w[0] for w in writes)

    # Read until a progress response confirms everything up to the last write.
    events: list[kv_pb2.Event] = []
    progress_revs: list[int] = []

    def confirmed() -> bool:
        """Read one response; whether it is the progress response awaited."""
        resp = watch.next(2)
        if resp is None:
            watch.send(progress_request=pb.WatchProgressRequest())
            return False
        if resp.watch_id == -1 or (not resp.events and not resp.created and not resp.canceled):
            # a bookmark: every event at or below it must already have arrived
            assert all(e.kv.mod_revision <= resp.header.revision for e in events)
            progress_revs.append(resp.header.revision)
            return resp.header.revision >= last and resp.watch_id == -1
        assert resp.watch_id == 0 and not resp.canceled, resp
        if progress_revs:
            assert all(e.kv.mod_revision > progress_revs[-1] for e in resp.events)
        events.extend(resp.events)
        return False

    eventually(confirmed, f"a progress response at or above revision {last}", 20, interval=0)
    watch.close()
    assert progress_revs == sorted(progress_revs) and progress_revs[-1] >= last

    writes.sort()
    assert [e.kv.mod_revision for e in events] == [w[0] for w in writes]
    state = {k: (v.value, v.create_revision, v.mod_revision, v.version) for k, v in listed.items()}
    for event, (rev, kind, key, value) in zip(events, writes, strict=True):
        assert event.kv.key == key
        before = state.get(key)
        if kind == "delete":
            assert event.type == kv_pb2.Event.DELETE
            assert (event.kv.create_revision, event.kv.version, event.kv.value) == (0, 0, b"")
            del state[key]
        else:
            assert event.type == kv_pb2.Event.PUT and event.kv.value == value
            create = before[1] if before else rev
            version = before[3] + 1 if before else 1
            assert (event.kv.create_revision, event.kv.version) == (create, version)
            state[key] = (value, create, rev, version)
        if before is None:
            assert not event.HasField("prev_kv") and event.kv.create_revision == rev
        else:  # every non-create event carries the previous object
            prev = event.prev_kv
            assert (prev.value, prev.create_revision, prev.mod_revision, prev.version) == before
    _, final = _paged_list(kv, pods)
    assert {
        k: (v.value, v.create_revision, v.mod_revision, v.version) for k, v in final.items()
    } == state
