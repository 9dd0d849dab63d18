"""Watch streams end cleanly: client cancellation, stream teardown, server shutdown."""

from __future__ import annotations

import asyncio
import time

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from tests.servers import GeminiServer, Postgres
from tests.waiting import eventually
from tests.watching import WatchClient


def _state(server: GeminiServer) -> tuple[int, int, int, list[str]]:
    async def probe() -> tuple[int, int, int, list[str]]:
        app = server.app
        assert app is not None and app.watch is not None and app.hub is not None
        # tasks serving watch streams (the handler and its request reader)
        tasks = [t.get_coro().__qualname__ for t in asyncio.all_tasks()]  # type: ignore[union-attr]
        watching = [
            name
            for name in tasks
            if name in ("WatchService.Watch", "WatchService.Watch.<locals>.receive")
        ]
        return len(app.watch.streams), len(app.hub.synced), len(app.hub.unsynced), watching

    return server.call(probe)


def _tasks_once(server: GeminiServer, want: tuple[int, int, int]) -> list[str]:
    """The tasks serving watch streams, once (streams, synced, unsynced watchers) is ``want``."""

    def reached() -> tuple[int, int, int, list[str]] | None:
        state = _state(server)
        return state if state[:3] == want else None

    state = eventually(reached, lambda: f"watch state {want}, not {_state(server)}")
    assert state is not None
    return state[3]


def test_cancel_close_and_shutdown_leave_nothing_behind(postgres: Postgres) -> None:
    server = GeminiServer(postgres.new_database("wlife")).start()
    stopped = False
    try:
        assert _tasks_once(server, (0, 0, 0)) == []
        stubs = server.stubs()
        clients = [WatchClient(stubs) for _ in range(5)]
        for _i, client in enumerate(clients):
            client.create(key=b"/life/", range_end=b"/life0")
            client.create(key=b"/life/a", start_revision=1)  # replays, then live
        _tasks_once(server, (5, 10, 0))
        stubs.kv.Put(pb.PutRequest(key=b"/life/a", value=b"v"))
        for client in clients:
            client.send(cancel_request=pb.WatchCancelRequest(watch_id=1))
        _tasks_once(server, (5, 5, 0))
        for client in clients[:3]:
            client.close()  # the client goes away mid-stream
        assert len(_tasks_once(server, (2, 2, 0))) == 2  # a request reader per open stream
        for client in clients[3:]:
            client.close()
        # no task per stream or watcher left running
        eventually(
            lambda: _state(server) == (0, 0, 0, []),
            lambda: f"no watch stream, watcher or task left, not {_state(server)}",
        )
        # shutdown with open streams ends them and returns
        open_clients = [WatchClient(stubs) for _ in range(3)]
        for client in open_clients:
            client.create(key=b"/life/", range_end=b"/life0")
        start = time.monotonic()
        server.stop()
        stopped = True
        assert time.monotonic() - start < 10
        for client in open_clients:
            assert client.ended(10)  # the stream ended on the client too
            client.close()
        stubs.close()
    finally:
        if not stopped:
            server.stop()
