"""The writer under load: requests from concurrent clients share write batches, and every
one is committed exactly once."""

from __future__ import annotations

import threading

from prometheus_client import REGISTRY

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from tests.servers import GeminiServer, Postgres


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_concurrent_writes_share_batches(postgres: Postgres) -> None:
    server = GeminiServer(postgres.new_database("gather"), batch_wait=0.05).start()
    try:
        count = "geminikv_writer_batch_requests_count"
        total = "geminikv_writer_batch_requests_sum"
        batches, requests = _sample(count), _sample(total)
        errors: list[Exception] = []

        def write(n: int) -> None:
            kv = server.stubs().kv
            try:
                for i in range(25):
                    kv.Put(pb.PutRequest(key=b"/gather/%d/%d" % (n, i), value=b"v"))
            except Exception as err:  # reported below
                errors.append(err)

        threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        written = _sample(total) - requests
        assert written == 200
        # requests from concurrent clients were committed together
        assert written / (_sample(count) - batches) > 1.5
        listed = server.stubs().kv.Range(
            pb.RangeRequest(key=b"/gather/", range_end=b"/gather0", count_only=True)
        )
        assert listed.count == 200
    finally:
        server.stop()
