"""A synchronous Watch stream client for tests."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import grpc

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from tests.servers import Stubs
from tests.waiting import eventually


class WatchClient:
    def __init__(self, stubs: Stubs, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self._requests: queue.Queue[pb.WatchRequest | None] = queue.Queue()
        self.received: queue.Queue[pb.WatchResponse] = queue.Queue()
        self.error: grpc.RpcError | None = None
        self._call = stubs.watch.Watch(iter(self._requests.get, None), metadata=metadata)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for resp in self._call:
                self.received.put(resp)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                self.error = err

    def send(self, **request: Any) -> None:
        self.send_request(pb.WatchRequest(**request))

    def send_request(self, request: pb.WatchRequest) -> None:
        self._requests.put(request)

    def create(self, **fields: Any) -> pb.WatchResponse:
        """Create a watch and return its ``created`` response."""
        self.send(create_request=pb.WatchCreateRequest(**fields))
        resp = self.next()
        assert resp is not None and resp.created, resp
        return resp

    def next(self, timeout: float = 10.0) -> pb.WatchResponse | None:
        try:
            return self.received.get(timeout=timeout)
        except queue.Empty:
            return None

    def events(self, count: int, quiet: float = 0.4, limit: float = 10.0) -> list[Any]:
        """The events received until there are ``count`` (waiting up to ``limit`` seconds),
        and any more that arrive within ``quiet`` after them."""
        out: list[Any] = []
        deadline = time.monotonic() + limit
        while len(out) < count and (left := deadline - time.monotonic()) > 0:
            resp = self.next(left)
            if resp is not None:
                out.extend(resp.events)
        return out + [e for r in self.drain(quiet) for e in r.events]

    def wait_canceled(self, awaited: str, timeout: float = 10.0) -> pb.WatchResponse:
        """The first response cancelling a watch (those before it are skipped)."""

        def canceled() -> pb.WatchResponse | None:
            resp = self.next(1.0)
            return resp if resp is not None and resp.canceled else None

        resp = eventually(canceled, awaited, timeout, interval=0)
        assert resp is not None
        return resp

    def drain(self, quiet: float = 0.4, limit: float = 10.0) -> list[pb.WatchResponse]:
        """Everything received until nothing arrives for ``quiet`` seconds."""
        out: list[pb.WatchResponse] = []
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            resp = self.next(quiet)
            if resp is None:
                break
            out.append(resp)
        return out

    def ended(self, timeout: float) -> bool:
        """Whether the stream has ended on this side, waiting up to ``timeout`` seconds."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()
        self._thread.join(5)
