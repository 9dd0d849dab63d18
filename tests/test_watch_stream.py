"""One watch stream's queue, on its own: what a client reads and in which order.

The stream is driven as the hub drives it (``queue_events``) behind a hub that only
answers the ``Watchable`` protocol, so the order of responses is decided here alone."""

from __future__ import annotations

from geminikv.mvcc.events import Event
from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.watch.stream import WatchStream
from geminikv.watch.watcher import Watcher


class QuietHub:
    """The Watchable protocol with nothing behind it: every watcher is synced at once."""

    def __init__(self) -> None:
        self.revision = 10

    def rebuilding(self) -> bool:
        return False

    def first_id(self, revision: int) -> int:
        return revision  # every revision is its row id here

    def add(self, watcher: Watcher) -> None:
        watcher.synced = True

    def remove(self, watcher: Watcher) -> None: ...

    def demote(self, watcher: Watcher) -> None: ...

    def wake(self) -> None: ...


def put(revision: int) -> Event:
    return Event(revision, revision, b"/a/%d" % revision, False, revision, 1, 0, b"v", None, None)


async def test_events_are_never_merged_past_a_progress_response() -> None:
    """A slow reader's queued events are merged into one response, but not across a
    progress response: that would deliver events above the revision it then reports
    (kube-apiserver's watch cache takes it as a bookmark)."""
    hub = QuietHub()
    stream = WatchStream(hub, lambda header, revision: setattr(header, "revision", revision))
    stream.handle(pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"/a", range_end=b"/b")))
    watcher = stream.watchers[0]
    stream.queue_events(watcher, [put(11)], 11, 0)
    hub.revision = 11
    stream.handle(pb.WatchRequest(progress_request=pb.WatchProgressRequest()))
    stream.queue_events(watcher, [put(12)], 12, 0)
    stream.queue_events(watcher, [put(13)], 13, 0)
    read = await stream.responses()
    shape = [
        (r.watch_id, r.header.revision, [e.kv.mod_revision for e in r.events], r.created)
        for r in read
    ]
    assert shape == [
        (0, 10, [], True),  # created
        (0, 11, [11], False),
        (-1, 11, [], False),  # progress: everything at or below 11 was sent
        (0, 13, [12, 13], False),  # merged, after the progress response
    ]
