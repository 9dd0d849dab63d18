"""Short human-readable descriptions of operations, changes and watchers for violations."""

from __future__ import annotations

from typing import Any

from tests.reliability.history import Operation, WatchRecord
from tests.reliability.model import (
    KV,
    Change,
    DeleteResult,
    PutResult,
    RangeResult,
    Result,
    TxnResult,
)

MAX_BYTES = 48


def show(data: bytes) -> str:
    """Bytes as text, shortened."""
    text = data.decode("utf-8", "backslashreplace")
    return text if len(text) <= MAX_BYTES else text[: MAX_BYTES - 3] + "..."


def key_range(key: bytes, range_end: bytes) -> str:
    if not range_end:
        return show(key)
    if range_end == b"\0":
        return f"[{show(key)}, end)"
    return f"[{show(key)}, {show(range_end)})"


def _request(kind: str, req: Any) -> str:
    if kind == "put":
        lease = f" lease={req.lease}" if req.lease else ""
        return f"put {show(req.key)}={show(req.value)}{lease}"
    if kind == "range":
        extra = f" at revision {req.revision}" if req.revision > 0 else ""
        return f"range {key_range(req.key, req.range_end)}{extra}"
    if kind == "delete":
        return f"delete {key_range(req.key, req.range_end)}"
    if kind == "txn":
        ops = ", ".join(_txn_op(op) for op in req.success)
        alt = ", ".join(_txn_op(op) for op in req.failure)
        return f"txn({len(req.compare)} compares) then [{ops}] else [{alt}]"
    if kind == "lease_grant":
        return f"lease_grant {req.ID}" if req.ID else f"lease_grant TTL={req.TTL}"
    if kind == "lease_revoke":
        return f"lease_revoke {req.ID}"
    return kind


def _txn_op(op: Any) -> str:
    which = op.WhichOneof("request")
    kind = {"request_put": "put", "request_range": "range", "request_delete_range": "delete"}
    name = kind.get(which or "", which or "?")
    return _request(name, getattr(op, which or ""))


def op(operation: Operation) -> str:
    """``client 3 put /k=v (revision 12)``: who, what, and the revision it got."""
    text = f"client {operation.client} {_request(operation.kind, operation.request)}"
    if operation.response is not None:
        return f"{text} (revision {operation.response.header.revision})"
    if operation.unknown:
        return f"{text} (unknown outcome: {operation.error})"
    return f"{text} (failed: {operation.error})"


def kv(state: KV | None) -> str:
    if state is None:
        return "absent"
    lease = f" lease={state.lease}" if state.lease else ""
    return (
        f"{show(state.key)}={show(state.value)} (create {state.create_revision}, "
        f"mod {state.mod_revision}, version {state.version}{lease})"
    )


def change(c: Change) -> str:
    if c.type == "DELETE":
        extra = "" if c.kv[1:] == (0, c.revision, 0, b"", 0) else f" {kv(c.kv)}"
        return f"DELETE {show(c.key)} at revision {c.revision}{extra}"
    return f"PUT {kv(c.kv)}"


def changes(cs: list[Change] | tuple[Change, ...]) -> str:
    return "[" + "; ".join(change(c) for c in cs) + "]" if cs else "nothing"


def watch(record: WatchRecord, index: int) -> str:
    req = record.request
    start = f" from revision {req.start_revision}" if req.start_revision else ""
    resumed = " (resumed)" if record.resumed else ""
    on = key_range(req.key, req.range_end)
    return f"watch #{index} of client {record.client} on {on}{start}{resumed}"


def result(r: Result | None) -> str:
    if isinstance(r, RangeResult):
        shown = ", ".join(kv(x) for x in r.kvs[:3])
        if len(r.kvs) > 3:
            shown += f", ... ({len(r.kvs)} kvs)"
        return f"count={r.count} more={r.more} kvs=[{shown}]"
    if isinstance(r, PutResult):
        return f"prev_kv={kv(r.prev_kv) if r.prev_kv else 'none'}"
    if isinstance(r, DeleteResult):
        return f"deleted={r.deleted} prev_kvs=[{', '.join(kv(x) for x in r.prev_kvs)}]"
    if isinstance(r, TxnResult):
        inner = "; ".join(result(x) for x in r.responses)
        return f"succeeded={r.succeeded} responses=[{inner}]"
    return "nothing" if r is None else "ok"


def mismatch(got: Result | None, want: Result | None) -> str:
    """``returned X; the model returns Y``, focused on the difference for ranges."""
    if isinstance(got, RangeResult) and isinstance(want, RangeResult):
        parts = []
        if got.count != want.count:
            parts.append(f"count {got.count}, model {want.count}")
        if got.more != want.more:
            parts.append(f"more {got.more}, model {want.more}")
        if len(got.kvs) != len(want.kvs):
            parts.append(f"{len(got.kvs)} kvs, model {len(want.kvs)}")
        for i, (a, b) in enumerate(zip(got.kvs, want.kvs, strict=False)):
            if a != b:
                parts.append(f"kv #{i} {kv(a)}, model {kv(b)}")
                break
        return "returned " + "; ".join(parts)
    return f"returned {result(got)}; the model returns {result(want)}"
