"""Drive a server with aetcd (PyPI) and print what it saw as JSON.

Runs in its own process: aetcd registers etcd's protobuf symbols in the default
descriptor pool, as geminikv does, and one process cannot hold both.
"""

from __future__ import annotations

import asyncio
import json
import sys

import aetcd


async def session(port: int, prefix: bytes) -> dict[str, object]:
    out: dict[str, object] = {}
    async with aetcd.Client(host="127.0.0.1", port=port, timeout=10) as c:
        await c.put(prefix + b"a", b"1")
        await c.put(prefix + b"b", b"2")
        got = await c.get(prefix + b"a")
        out["get"] = [got.value.decode(), got.version] if got else None
        out["missing"] = await c.get(prefix + b"missing")
        out["prefix"] = [kv.key.decode() for kv in await c.get_prefix(prefix)]
        out["range"] = [kv.value.decode() for kv in await c.get_range(prefix + b"a", prefix + b"b")]
        deleted = await c.delete(prefix + b"b")
        out["deleted"] = deleted.deleted if deleted else None
        out["after_delete"] = [kv.key.decode() for kv in await c.get_prefix(prefix)]
        key = prefix + b"k"
        await c.put(key, b"1")
        txn = c.transactions
        ok1, _ = await c.transaction(
            compare=[txn.value(key) == b"1"],
            success=[txn.put(key, b"10")],
            failure=[txn.get(key)],
        )
        ok2, responses = await c.transaction(
            compare=[txn.value(key) == b"1"],
            success=[txn.put(key, b"20")],
            failure=[txn.get(key)],
        )
        final = await c.get(key)
        out["txn"] = [ok1, ok2, responses[0][0][0].decode(), final.value.decode(), final.version]
        lease = await c.lease(ttl=30)
        await c.put(prefix + b"leased", b"v", lease=lease)
        leased = await c.get(prefix + b"leased")
        out["lease"] = [leased.lease == lease.id, 0 < await lease.remaining_ttl() <= 30]
        await lease.revoke()
        out["lease_revoked"] = await c.get(prefix + b"leased") is None
        watch = await c.watch_prefix(prefix + b"w/")

        async def write_later() -> None:
            await asyncio.sleep(0.3)
            await c.put(prefix + b"w/1", b"hello")
            await c.delete(prefix + b"w/1")

        task = asyncio.create_task(write_later())
        seen = []
        async for event in watch:
            seen.append([str(event.kind), event.kv.key.decode(), event.kv.value.decode()])
            if len(seen) == 2:
                break
        await watch.cancel()
        await task
        out["watch"] = seen
    return out


if __name__ == "__main__":
    result = asyncio.run(session(int(sys.argv[1]), sys.argv[2].encode()))
    print(json.dumps(result))
