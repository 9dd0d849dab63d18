"""etcdserverpb.Watch: one bidi stream, many watchers (watch/stream.py does the work)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc

from geminikv import tasks
from geminikv.config import WATCH_COALESCE_SECONDS
from geminikv.errors import ServerStopped
from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.proto.etcdserverpb import rpc_pb2_grpc
from geminikv.server.auth import Guard
from geminikv.server.rpc import Identity, abort_stream
from geminikv.watch.hub import Hub
from geminikv.watch.stream import WatchStream

log = logging.getLogger(__name__)


class WatchService(rpc_pb2_grpc.WatchServicer):
    def __init__(
        self, hub: Hub, identity: Identity, progress_interval: float, guard: Guard
    ) -> None:
        self.hub = hub
        self.guard = guard
        self.identity = identity
        self.progress_interval = progress_interval
        self.streams: set[WatchStream] = set()
        self._ticker: asyncio.Task[None] | None = None
        self.stopping = False

    def start(self) -> None:
        self._ticker = asyncio.create_task(self._tick(), name="watch-progress")

    async def stop(self) -> None:
        """End every stream with etcd's "server stopped" (Unavailable): clients resume
        their watches on another endpoint."""
        self.stopping = True
        await tasks.stop(self._ticker)
        for stream in list(self.streams):
            stream.close()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.progress_interval)
            for stream in list(self.streams):
                stream.progress_tick()

    async def Watch(
        self, request_iterator: AsyncIterator[pb.WatchRequest], context: grpc.aio.ServicerContext
    ) -> None:
        stream = WatchStream(self.hub, self.identity.fill)
        self.streams.add(stream)
        failed: list[Exception] = []

        async def receive() -> None:
            # A client that half-closes keeps its watches (etcd's recvLoop returns on EOF
            # without ending the stream); a request that cannot be read ends the stream.
            try:
                async for request in request_iterator:
                    if self.guard.enabled and request.HasField("create_request"):
                        # etcd checks the watched range once, when the watch is created
                        reason = await self.guard.watch_refusal(request.create_request, context)
                        if reason is not None:
                            stream._refuse(reason)
                            continue
                    stream.handle(request)
            except Exception as err:
                failed.append(err)
                stream.close()

        receiver = asyncio.create_task(receive())
        try:
            while True:
                responses = await stream.responses()
                if not responses:
                    break
                for resp in responses:
                    await context.write(resp)
                if stream.pending():
                    # Busy: let events gather so each watcher gets fewer, larger messages.
                    await asyncio.sleep(WATCH_COALESCE_SECONDS)
            if self.stopping:
                await context.abort(ServerStopped.code, ServerStopped.message)
            if failed:
                await abort_stream(context, failed[0], "Watch")
        finally:
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await receiver
            stream.close()
            self.streams.discard(stream)
