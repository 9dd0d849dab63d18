"""geminikv as a process on a node (``python -m geminikv`` in the node's namespace), and a
client writing keys one after another through it, recording what was acknowledged."""

from __future__ import annotations

import queue
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.proto.etcdserverpb import rpc_pb2_grpc
from geminikv.proto.mvccpb import kv_pb2 as mvccpb
from tests.ha.node import Node

GEMINI_PORT = 22379
METRICS_PORT = 22380
REPO = Path(__file__).resolve().parents[2]


class Gemini:
    """geminikv on ``node`` (dies with it), configured with both hosts."""

    def __init__(self, node: Node, endpoint: str, *args: str) -> None:
        self.node = node
        self.address = f"{node.address}:{GEMINI_PORT}"
        self.metrics_address = f"{node.address}:{METRICS_PORT}"
        self.log = node.home / "geminikv.log"
        node.spawn(
            sys.executable, "-m", "geminikv",
            "--endpoint", endpoint,
            "--listen-address", self.address,
            "--metrics-bind-address", self.metrics_address,
            *args,
            log=self.log,
            as_postgres=False,
            env={"PYTHONPATH": str(REPO)},
        )  # fmt: skip

    def wait_listening(self, timeout: float = 60) -> Gemini:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((self.node.address, GEMINI_PORT), timeout=0.5):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"geminikv did not listen:\n{self.output()}") from None
                time.sleep(0.1)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def metric(self, name: str, timeout: float = 2.0) -> float | None:
        """The value of an unlabelled metric on /metrics; None if it does not answer."""
        try:
            with urllib.request.urlopen(
                f"http://{self.metrics_address}/metrics", timeout=timeout
            ) as answer:
                text = answer.read().decode()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None

    def stubs(self) -> tuple[grpc.Channel, rpc_pb2_grpc.KVStub, rpc_pb2_grpc.LeaseStub]:
        channel = grpc.insecure_channel(self.address)
        return channel, rpc_pb2_grpc.KVStub(channel), rpc_pb2_grpc.LeaseStub(channel)

    def kv(self) -> tuple[grpc.Channel, rpc_pb2_grpc.KVStub]:
        channel = grpc.insecure_channel(self.address)
        return channel, rpc_pb2_grpc.KVStub(channel)


@dataclass
class Writer:
    """Puts ``<prefix><n>`` = ``v<n>`` one after another from a thread; ``acked`` holds
    every acknowledged key with the monotonic times its Put was sent and answered."""

    gemini: Gemini
    prefix: bytes = b"/ha/"
    timeout: float = 2.0
    acked: list[tuple[bytes, bytes, float, float]] = field(default_factory=list)
    failures: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Writer:
        self._thread = threading.Thread(target=self._run, name="ha-writer", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        channel, kv = self.gemini.kv()
        n = 0
        try:
            while not self._stop.is_set():
                key, value = self.prefix + b"%08d" % n, b"v%d" % n
                n += 1
                sent = time.monotonic()
                try:
                    kv.Put(pb.PutRequest(key=key, value=value), timeout=self.timeout)
                except grpc.RpcError:
                    self.failures += 1
                    time.sleep(0.05)
                    continue
                self.acked.append((key, value, sent, time.monotonic()))
        finally:
            channel.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout + 10)

    def first_ack_after(self, moment: float) -> float | None:
        """When the first write sent after ``moment`` was acknowledged."""
        return next((at for _, _, sent, at in self.acked if sent > moment), None)

    def wait_acks_after(self, moment: float, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while sum(1 for _, _, sent, _ in self.acked if sent > moment) < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{count} writes not acknowledged within {timeout} s of the fault "
                    f"({self.failures} failed attempts):\n{self.gemini.output()[-4000:]}"
                )
            time.sleep(0.05)

    def missing(self) -> list[bytes]:
        """Acknowledged keys that geminikv does not return with their value now."""
        channel, kv = self.gemini.kv()
        try:
            answer = kv.Range(
                pb.RangeRequest(key=self.prefix, range_end=self.prefix[:-1] + b"0"), timeout=30
            )
        finally:
            channel.close()
        have = {item.key: item.value for item in answer.kvs}
        return [key for key, value, _, _ in self.acked if have.get(key) != value]

    def explain(self, missing: list[bytes], nodes: tuple[Node, ...]) -> str:
        """Where acknowledged keys geminikv does not return are (a failure message): in
        which node's table, next to geminikv's log."""
        if not missing:
            return ""
        names = [key.decode() for key in missing]
        found = []
        for node in nodes:
            try:
                rows = node.sql(
                    "SELECT format('in recovery %s, newest id %s, %s of the keys, their ids "
                    "%s..%s', pg_is_in_recovery(), (SELECT max(id) FROM kine), count(*), "
                    "min(id), max(id)) FROM kine WHERE name = ANY($1::text[])",
                    names,
                    database="kubernetes",
                )
            except Exception as err:  # a node may be down: say so and go on
                rows = f"unreachable ({err!r})"
            found.append(f"{node.name}: {rows}")
        return (
            f"{len(missing)} acknowledged keys missing, {missing[0]!r}..{missing[-1]!r}\n"
            + "\n".join(found)
            + f"\ngeminikv's log (end):\n{self.gemini.output()[-6000:]}"
        )


class Watcher:
    """One Watch stream on ``prefix`` from ``start`` (revision 1), its events collected by
    a thread; ``deletes`` has each DELETE's key and the monotonic time it arrived."""

    def __init__(self, gemini: Gemini, prefix: bytes = b"/ha/", start: int = 1) -> None:
        self.events: list[tuple[bytes, bytes, int]] = []  # key, value, mod_revision
        self.deletes: list[tuple[bytes, float]] = []
        self.responses: list[pb.WatchResponse] = []
        self.error: grpc.RpcError | None = None
        self._requests: queue.Queue[pb.WatchRequest | None] = queue.Queue()
        self._channel, _ = gemini.kv()
        create = pb.WatchCreateRequest(
            key=prefix, range_end=prefix[:-1] + b"0", start_revision=start
        )
        self._requests.put(pb.WatchRequest(create_request=create))
        stream = rpc_pb2_grpc.WatchStub(self._channel).Watch(iter(self._requests.get, None))
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Iterator[pb.WatchResponse]) -> None:
        try:
            for response in stream:
                self.responses.append(response)
                for event in response.events:
                    kv = event.kv
                    self.events.append((kv.key, kv.value, kv.mod_revision))
                    if event.type == mvccpb.Event.DELETE:
                        self.deletes.append((kv.key, time.monotonic()))
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                self.error = err

    def wait_for(self, keys: set[bytes], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not keys <= {key for key, _, _ in self.events}:
            if time.monotonic() > deadline or self.error is not None:
                return
            time.sleep(0.05)

    def close(self) -> None:
        self._requests.put(None)
        self._channel.close()
        self._thread.join(10)


def check_watch(watcher: Watcher, acked: set[bytes]) -> None:
    """The watch went on across the failover: every acknowledged write seen once, in
    revision order, with no cancel or error."""
    assert watcher.error is None, watcher.error
    assert not any(response.canceled for response in watcher.responses)
    revisions = [rev for _, _, rev in watcher.events]
    assert revisions == sorted(set(revisions))
    keys = [key for key, _, _ in watcher.events]
    assert keys == sorted(set(keys))  # written one after another, each once
    assert acked <= set(keys)


def check_nothing_lost(
    writer: Writer,
    watcher: Watcher,
    label: str,
    fault: float,
    promoted: float,
    nodes: tuple[Node, ...] = (),
) -> None:
    """After a failover (``fault`` and ``promoted`` from time.monotonic()): print how long
    writes stopped, then check that every acknowledged write reads back and that the
    watch saw each once, in order, uncancelled."""
    acked = {key for key, *_ in writer.acked}
    watcher.wait_for(acked)
    watcher.close()
    first = writer.first_ack_after(fault)
    assert first is not None
    print(
        f"\n{label}: fault -> first acknowledged write {first - fault:.2f} s (promotion "
        f"{promoted - fault:.2f} s after the fault; geminikv's share {first - promoted:.2f} s); "
        f"{len(writer.acked)} writes acknowledged, {writer.failures} failed attempts"
    )
    missing = writer.missing()
    assert not missing, writer.explain(missing, nodes)
    check_watch(watcher, acked)
