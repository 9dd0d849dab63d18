"""The model of etcd's key-value store (model.py) on its own. No servers."""

from __future__ import annotations

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from tests.reliability.model import KV, PUT, Change, Evaluation, RangeResult, Store, evaluate
from tests.reliability.simulated import PREFIX, PREFIX_END, get, put


def test_model_follows_etcd_semantics() -> None:
    store = Store()
    a, b, c = PREFIX + b"a", PREFIX + b"b", PREFIX + b"c"
    for rev, (key, value) in enumerate([(a, b"1"), (b, b"2"), (a, b"3"), (c, b"4")], start=2):
        for change in evaluate(store, "put", put(key, value), rev, "key").changes:
            store.apply(change)
    assert store.get(a) == KV(a, 2, 4, 2, b"3", 0)
    # count is everything in the range, more says the limit cut it
    assert store.read(get(PREFIX, PREFIX_END, limit=2)) == RangeResult(
        (KV(a, 2, 4, 2, b"3", 0), KV(b, 3, 3, 1, b"2", 0)), 3, True
    )
    assert store.read(get(b, b"\0", count_only=True)) == RangeResult((), 2, False)
    # a VALUE compare on a missing key is false, a VERSION one compares with 0
    missing = PREFIX + b"zz"
    value_cmp = pb.Compare(key=missing, target=pb.Compare.VALUE, value=b"", result=pb.Compare.EQUAL)
    version_cmp = pb.Compare(
        key=missing, target=pb.Compare.VERSION, version=0, result=pb.Compare.EQUAL
    )
    ev = Evaluation(store, 6, "key")
    assert not ev.compare(value_cmp)
    assert ev.compare(version_cmp)
    # a compare over a range holds only if every key satisfies it
    ranged = pb.Compare(
        key=a, range_end=PREFIX_END, target=pb.Compare.VERSION, result=pb.Compare.EQUAL
    )
    ranged.version = 1
    assert not ev.compare(ranged)
    # one revision per changed key in "key" mode, one per request in "txn" mode
    delete_all = pb.DeleteRangeRequest(key=PREFIX, range_end=PREFIX_END)
    keyed = evaluate(store, "delete", delete_all, 6, "key")
    assert [ch.revision for ch in keyed.changes] == [6, 7, 8]
    shared = evaluate(store, "delete", delete_all, 6, "txn")
    assert [ch.revision for ch in shared.changes] == [6, 6, 6]
    assert keyed.changes[0] == Change("DELETE", KV(a, 0, 6, 0, b"", 0))
    # a key deleted and put again starts over at version 1
    for change in keyed.changes:
        store.apply(change)
    (again,) = evaluate(store, "put", put(a, b"5"), 9, "key").changes
    assert again == Change(PUT, KV(a, 9, 9, 1, b"5", 0))
