"""Watch streams, differential: the same watches and writes against etcd and geminikv."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from tests.differential import Pair
from tests.servers import Etcd, GeminiServer, Postgres
from tests.watching import WatchClient

pytestmark = pytest.mark.etcd

W = pb.WatchCreateRequest


class WatchPair:
    """One watch stream on each server."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        self.e = WatchClient(pair.etcd)
        self.g = WatchClient(pair.gk)

    def send(self, build: Callable[[Callable[[int], int]], pb.WatchRequest]) -> None:
        self.e.send_request(build(self.pair.etcd_rev))
        self.g.send_request(build(self.pair.gk_rev))

    def create(self, build: Callable[[Callable[[int], int]], W]) -> None:
        self.send(lambda rev: pb.WatchRequest(create_request=build(rev)))

    def compare(self, quiet: float = 0.5) -> list[object]:
        """Responses per watch id, in order (etcd interleaves watchers arbitrarily)."""
        e = self._by_watch(self.e.drain(quiet), self.pair.etcd_to_rel)
        g = self._by_watch(self.g.drain(quiet), self.pair.gk_to_rel)
        assert g == e, f"watch responses differ:\n etcd:     {e}\n geminikv: {g}"
        return [r for responses in e.values() for r in responses]

    def _by_watch(
        self, responses: list[pb.WatchResponse], to_rel: Callable[[int], int]
    ) -> dict[int, list[object]]:
        grouped: dict[int, list[object]] = {}
        for r in responses:
            grouped.setdefault(r.watch_id, []).append(self.pair.normalise(("ok", r), to_rel))
        return grouped

    def close(self) -> None:
        self.e.close()
        self.g.close()


def put(pair: Pair, key: bytes, value: bytes) -> None:
    pair.check("Put", lambda rev: pb.PutRequest(key=key, value=value))


def test_watch_live_and_replay(pair: Pair, prefix: bytes) -> None:
    p = prefix
    put(pair, p + b"a", b"1")
    put(pair, p + b"b", b"1")
    put(pair, p + b"a", b"2")
    pair.check("DeleteRange", lambda rev: pb.DeleteRangeRequest(key=p + b"b"))
    w = WatchPair(pair)
    try:
        w.create(lambda rev: W(key=p + b"a"))
        w.create(lambda rev: W(key=p, range_end=p[:-1] + b"0", prev_kv=True))
        w.create(lambda rev: W(key=p, range_end=p[:-1] + b"0", start_revision=rev(1)))
        w.create(lambda rev: W(key=p, range_end=p[:-1] + b"0", start_revision=rev(2), prev_kv=True))
        w.create(
            lambda rev: W(
                key=p + b"b",
                range_end=b"\x00",
                start_revision=rev(1),
                filters=[W.NOPUT],
                prev_kv=True,
            )
        )
        w.create(
            lambda rev: W(
                key=p, range_end=p[:-1] + b"0", start_revision=rev(1), filters=[W.NODELETE]
            )
        )
        w.create(lambda rev: W(key=p, range_end=p[:-1] + b"0", start_revision=rev(7)))
        w.create(lambda rev: W(key=p + b"a", watch_id=100, start_revision=rev(3)))
        w.compare()
        put(pair, p + b"a", b"3")
        put(pair, p + b"c", b"1")
        pair.check("DeleteRange", lambda rev: pb.DeleteRangeRequest(key=p + b"a"))
        put(pair, p + b"b", b"again")
        w.compare()
    finally:
        w.close()


def test_watch_ids_cancel_and_errors(pair: Pair, prefix: bytes) -> None:
    w = WatchPair(pair)
    try:
        w.create(lambda rev: W(key=prefix + b"x"))
        w.create(lambda rev: W(key=prefix + b"x", watch_id=7))
        w.create(lambda rev: W(key=prefix + b"x", watch_id=7))  # duplicate
        w.create(lambda rev: W(key=prefix + b"z", range_end=prefix + b"a"))  # empty range
        w.create(lambda rev: W(key=prefix + b"x"))
        w.compare()
        w.send(lambda rev: pb.WatchRequest(cancel_request=pb.WatchCancelRequest(watch_id=7)))
        w.send(lambda rev: pb.WatchRequest(cancel_request=pb.WatchCancelRequest(watch_id=55)))
        w.compare()
        put(pair, prefix + b"x", b"1")
        w.compare()
        w.send(lambda rev: pb.WatchRequest(progress_request=pb.WatchProgressRequest()))
        w.compare()
    finally:
        w.close()


def test_watch_empty_key_means_everything_from_zero(pair: Pair, prefix: bytes) -> None:
    w = WatchPair(pair)
    try:
        w.create(lambda rev: W(key=b"", range_end=b"\x00"))
        w.compare()
        put(pair, prefix + b"k", b"v")
        w.compare()
    finally:
        w.close()


def test_watch_fragments(pair: Pair, prefix: bytes) -> None:
    big = b"x" * (700 * 1024)
    for i in range(4):
        put(pair, prefix + b"%d" % i, big)
    w = WatchPair(pair)
    try:
        w.create(
            lambda rev: W(
                key=prefix, range_end=prefix[:-1] + b"0", start_revision=rev(1), fragment=True
            )
        )
        responses = w.compare(quiet=1.0)
        assert len(responses) > 2  # created, then several fragments
    finally:
        w.close()


def test_watch_compacted_start(postgres: Postgres) -> None:
    etcd = Etcd().start()
    gemini = GeminiServer(postgres.new_database("wcompact")).start()
    try:
        pair = Pair(etcd.stubs(), gemini.stubs())
        for i in range(5):
            put(pair, b"/c/k", b"%d" % i)
        pair.check("Compact", lambda rev: pb.CompactionRequest(revision=rev(4)))
        w = WatchPair(pair)
        try:
            w.create(lambda rev: W(key=b"/c/k", start_revision=rev(2)))
            w.create(lambda rev: W(key=b"/c/k", start_revision=rev(4), prev_kv=True))
            w.create(lambda rev: W(key=b"/c/k", start_revision=rev(5), prev_kv=True))
            w.compare(quiet=1.0)
            pair.check("Range", lambda rev: pb.RangeRequest(key=b"/c/k", revision=rev(3)))
            pair.check("Range", lambda rev: pb.RangeRequest(key=b"/c/k", revision=rev(4)))
        finally:
            w.close()
    finally:
        gemini.stop()
        etcd.stop()
