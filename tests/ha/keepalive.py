"""A lease kept alive from a thread as etcd's clientv3 keeps one: a LeaseKeepAlive stream
with a request every ``interval`` seconds; when the stream ends with an error (the server
has no leader, or no database), it is opened again 0.5 s later (clientv3's
``retryConnWait``). Every answer is recorded, so a test sees whether the lease was ever
reported gone (TTL 0)."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import grpc

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.proto.etcdserverpb import rpc_pb2_grpc

RETRY_CONN_WAIT = 0.5  # clientv3's retryConnWait


@dataclass
class KeepAlive:
    address: str  # host:port of the etcd endpoint
    lease: int
    interval: float = 0.5
    answers: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, TTL)
    errors: list[tuple[float, grpc.StatusCode]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> KeepAlive:
        self._thread = threading.Thread(target=self._run, name="keepalive", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        channel = grpc.insecure_channel(self.address)
        stub = rpc_pb2_grpc.LeaseStub(channel)
        try:
            while not self._stop.is_set():
                self._stream(stub)
                self._stop.wait(RETRY_CONN_WAIT)
        finally:
            channel.close()

    def _stream(self, stub: rpc_pb2_grpc.LeaseStub) -> None:
        requests: queue.Queue[pb.LeaseKeepAliveRequest | None] = queue.Queue()
        call = stub.LeaseKeepAlive(iter(requests.get, None))
        try:
            while not self._stop.is_set():
                requests.put(pb.LeaseKeepAliveRequest(ID=self.lease))
                answer = next(call)
                self.answers.append((time.monotonic(), answer.TTL))
                self._stop.wait(self.interval)
        except grpc.RpcError as err:
            self.errors.append((time.monotonic(), err.code()))
        finally:
            requests.put(None)
            call.cancel()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)

    def gone(self) -> list[tuple[float, int]]:
        """Answers that said the lease no longer exists."""
        return [(at, ttl) for at, ttl in self.answers if ttl <= 0]
