"""The geminikv process: PostgreSQL (embedded or external), the store, the gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import hashlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from geminikv import metrics, tasks
from geminikv.alarms import Alarms
from geminikv.auth.store import AuthStore
from geminikv.auth.tokens import make_tokens
from geminikv.compact import Compactor
from geminikv.config import (
    AUTH_POLL_INTERVAL,
    GC_YOUNG_THRESHOLD,
    LEASE_COUNT_INTERVAL,
    MALLOC_MMAP_THRESHOLD,
    Settings,
)
from geminikv.leader import Leader
from geminikv.lease import KineTtls, Leases
from geminikv.members import Members
from geminikv.mvcc.applier import Applier
from geminikv.mvcc.compaction import Compaction
from geminikv.mvcc.follower import Follower
from geminikv.mvcc.gaps import Gaps
from geminikv.mvcc.index import Index
from geminikv.mvcc.index import load as load_index
from geminikv.mvcc.kvstore import KVStore
from geminikv.mvcc.lag import Lag
from geminikv.mvcc.read_index import ReadIndex
from geminikv.mvcc.rewind import Rebuilding, Rewind
from geminikv.mvcc.values import Values
from geminikv.mvcc.writer import Writer
from geminikv.proto.etcdserverpb import rpc_pb2_grpc
from geminikv.server import scheduling, wire
from geminikv.server.auth import AuthService, Guard, guarded
from geminikv.server.cluster import ClusterService
from geminikv.server.gateway import Gateway, server_tls
from geminikv.server.kv import KVService
from geminikv.server.lease import LeaseService
from geminikv.server.listeners import Listeners, listen
from geminikv.server.maintenance import MaintenanceService
from geminikv.server.registration import UndecodableAsInternal
from geminikv.server.rpc import Identity
from geminikv.server.watch import WatchService
from geminikv.storage import database, kine, schema
from geminikv.storage.embedded import EmbeddedPostgres
from geminikv.storage.primary import Heartbeat, Primary
from geminikv.storage.session import Session
from geminikv.storage.sqlstats import SqlObserver
from geminikv.watch.hub import Hub

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ListenAddress:
    grpc_target: str  # what grpc's add_*_port takes
    client_url: str  # what MemberList advertises


def parse_listen_address(text: str, tls: bool = False) -> ListenAddress:
    """Kine's forms: host:port, http://host:port, https://host:port, unix://path."""
    if text.startswith("unix://"):
        path = text[len("unix://") :]
        return ListenAddress(f"unix:{path}", text)
    for scheme in ("http://", "https://"):
        if text.startswith(scheme):
            text = text[len(scheme) :]
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"invalid listen address {text!r}: expected host:port or unix://path")
    host = host or "0.0.0.0"
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "[::]") else host
    scheme = "https" if tls else "http"
    return ListenAddress(f"{host}:{port}", f"{scheme}://{shown}:{port}")


def member_id(settings: Settings) -> int:
    """This process's etcd member id: its host and client address."""
    return _id64("member", socket.gethostname(), settings.listen_address)


def _id64(*parts: str) -> int:
    digest = hashlib.blake2b("\0".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << 63) - 1) or 1


@dataclass(frozen=True, slots=True)
class Parts:
    """What ``build`` makes that the App starts, serves and stops."""

    store: KVStore
    hub: Hub
    leases: Leases
    compactor: Compactor
    leader: Leader
    heartbeat: Heartbeat | None


def build(
    settings: Settings,
    pool: asyncpg.Pool,
    session: Session,
    reconnect: Callable[[], Awaitable[asyncpg.Connection]],
    connect: Callable[[], Awaitable[asyncpg.Connection]],
    primary: Primary | None = None,
) -> Parts:
    """The whole object graph, each part given what it talks to (as etcd's NewServer).

    ``session``: the writer's connection; ``reconnect``: one attempt at a new connection
    (the writer's and the listener's after an outage); ``connect``: a connection, waiting
    for PostgreSQL (the leader's session); ``primary``: which PostgreSQL host is the
    primary, followed by a heartbeat (docs/architecture.md#failover)."""
    s = settings
    alarms = Alarms(pool, member_id(s), s.quota_backend_bytes)
    index = Index()
    values = Values(pool, s.value_cache_size * 1024 * 1024)
    lag = Lag(index)
    kine_ttls = KineTtls(index)
    rebuilding = Rebuilding()
    hub = Hub(pool, index, rebuilding)
    applier = Applier(index, values, lag, subscribers=(kine_ttls.on_events, hub.publish))
    compaction = Compaction(pool, index)
    gaps = Gaps(pool)

    async def holds(rev: int) -> tuple[int, bool, int]:
        async with pool.acquire() as conn:
            return await kine.holds(conn, rev)

    rewind = Rewind(
        index,
        functools.partial(load_index, pool),
        applier,
        values,
        compaction,
        gaps,
        rebuilding,
        hub.cancel_all,
        holds,
    )
    follower = Follower(
        pool,
        applier,
        lag,
        compaction,
        gaps,
        rewind,
        session.pid,
        s.poll_interval,
        reconnect,
        s.poll_batch_size,
        on_alarms=alarms.changed,
    )
    reads = ReadIndex(
        follower.listener, applier, lag, rewind, follower.wait_for, follower.catch_up, s.batch_wait
    )
    writer = Writer(session, index, follower, rewind, rebuilding, values, s.batch_wait)
    leader_wake = asyncio.Event()  # a compaction wakes the leader to purge the rows
    store = KVStore(
        pool,
        session,
        index,
        values,
        follower,
        reads,
        writer,
        compaction,
        rewind,
        rebuilding,
        alarms,
        on_compact=leader_wake.set,
    )
    leases = Leases(store, kine_ttls)
    compactor = Compactor(store, follower, s)
    leader = Leader(
        connect,
        duties=[leases.expire, compactor.run],
        on_change=[leases.leadership, compactor.leadership],
        wake=leader_wake,
        promote=[leases.promote],
    )
    heartbeat = None
    if primary is not None:
        heartbeat = Heartbeat(
            reconnect, primary, s.datastore_heartbeat_interval, s.datastore_heartbeat_timeout
        )

        def lost() -> None:
            # its connections are terminated already (Primary.drop): the follower listens
            # again now, the pool opens fresh ones, the writer reconnects at its next batch
            follower.catch_up()
            tasks.spawn(pool.expire_connections())

        def changed(_host: str) -> None:
            tasks.spawn(pool.expire_connections())
            rewind.failed_over()

        primary.on_lost(lost)
        primary.on_change(changed)
    return Parts(store, hub, leases, compactor, leader, heartbeat)


class App:
    """Everything one geminikv process runs; ``start`` then ``wait`` then ``stop``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.embedded: EmbeddedPostgres | None = None
        self.pool: asyncpg.Pool | None = None
        self.writer_conn: asyncpg.Connection | None = None
        self.store: KVStore | None = None
        self.servers: Listeners | None = None
        self.hub: Hub | None = None
        self.watch: WatchService | None = None
        self.leases: Leases | None = None
        self.leader: Leader | None = None
        self.heartbeat: Heartbeat | None = None
        self.auth: AuthStore | None = None
        self.health = metrics.Health()
        self.http: WSGIServer | None = None
        self.gateway: Gateway | None = None
        self._gateway_dir: str | None = None
        self._health_task: asyncio.Task[None] | None = None
        self.members: Members | None = None
        self.lease_count = 0  # counted by the health task, read by the geminikv_leases gauge
        self.address = parse_listen_address(
            settings.listen_address, tls=bool(settings.server_cert_file)
        )
        self.port = 0

    async def start(self) -> None:
        s = self.settings
        tokens_for = make_tokens(s.auth_token, s.auth_token_ttl)  # JWT keys read first
        dsn = s.endpoint
        if not dsn:
            self.embedded = EmbeddedPostgres(s.data_dir)
            dsn = await asyncio.to_thread(self.embedded.start)
        log.info("connecting to PostgreSQL at %s", database.redact(dsn))
        backend = database.Backend.create(
            dsn,
            database.client_tls(s.ca_file, s.cert_file, s.key_file, s.skip_verify),
            SqlObserver(s.slow_sql_threshold, s.slow_sql_warning_threshold),
            database.Timeouts(
                s.datastore_connect_timeout, s.datastore_command_timeout, s.datastore_tcp_timeout
            ),
        )
        self.writer_conn = await database.connect(backend)
        await schema.ensure_schema(self.writer_conn)
        self.pool = await database.create_pool(
            backend, s.datastore_max_open_connections, s.datastore_connection_max_idle_time
        )

        def reconnect() -> Awaitable[asyncpg.Connection]:
            return database.connect_once(backend)

        def connect() -> Awaitable[asyncpg.Connection]:
            return database.connect(backend)

        session = Session(self.writer_conn, reconnect)
        parts = build(s, self.pool, session, reconnect, connect, backend.primary)
        self.store, self.hub, self.leases = parts.store, parts.hub, parts.leases
        self.compactor, self.leader = parts.compactor, parts.leader
        self.heartbeat = parts.heartbeat
        if self.heartbeat is not None:
            heartbeat = self.heartbeat
            self.health.primary_reachable = lambda: heartbeat.reachable
            metrics.POSTGRES_REACHABLE.set_function(lambda: int(heartbeat.reachable))
            self.heartbeat.start()
        await self.store.start()
        identity = await self._identity()
        self.members = Members(
            self.pool, (identity.member_id, identity.name, [identity.client_url])
        )
        await self.members.announce()
        tokens = tokens_for(self.pool)
        self.auth = AuthStore(self.pool, connect, tokens, s.bcrypt_cost, AUTH_POLL_INTERVAL)
        await self.auth.start()
        guard = Guard(self.auth, self.store.index.lease_keys, s.client_cert_auth)

        kv = KVService(self.store, identity, guard)
        maintenance = MaintenanceService(
            self.store, identity, s.emulated_etcd_version, self.members
        )
        cluster = ClusterService(self.store, identity, self.members)
        await self.hub.start()
        self.watch = WatchService(self.hub, identity, s.watch_progress_notify_interval, guard)
        self.watch.start()
        await self.leader.start()
        lease = LeaseService(self.leases, identity, guard)
        store = self.store
        auth = AuthService(guard, identity, lambda: store.revision)
        health_servicer = health.aio.HealthServicer()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        watch = self.watch

        def register(grpc_server: grpc.aio.Server) -> None:
            # the Maintenance and Cluster methods etcd guards get checks at registration
            server = UndecodableAsInternal(grpc_server, wire.CODECS, guarded(guard))
            rpc_pb2_grpc.add_KVServicer_to_server(kv, server)
            rpc_pb2_grpc.add_MaintenanceServicer_to_server(maintenance, server)
            rpc_pb2_grpc.add_ClusterServicer_to_server(cluster, server)
            rpc_pb2_grpc.add_WatchServicer_to_server(watch, server)
            rpc_pb2_grpc.add_LeaseServicer_to_server(lease, server)
            rpc_pb2_grpc.add_AuthServicer_to_server(auth, server)
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)

        gateway_socket = None
        if s.http_listen_address not in ("", "0"):
            # the gateway's own way in: a socket in a directory only this user can open,
            # so it needs no client certificate where the client address requires one
            self._gateway_dir = tempfile.mkdtemp(prefix="geminikv-gateway-")
            gateway_socket = f"unix:{self._gateway_dir}/grpc.sock"
        self.servers = await listen(
            self.address.grpc_target,
            s.grpc_listeners,
            shared=s.workers > 1,
            credentials=self._tls(),
            register=register,
            extra=gateway_socket,
        )
        self.port = self.servers.port
        self._watch_gauges()
        self.http = metrics.serve_http(s.metrics_bind_address, self.health)
        if gateway_socket is not None:
            alarms = self.store.alarms
            self.gateway = Gateway(
                gateway_socket,
                self.health,
                self.store.reads.read,
                lambda: [kind for _, kind in alarms.raised],
                s.emulated_etcd_version,
            )
            tls = server_tls(s.server_cert_file, s.server_key_file, s.trusted_ca_file)
            await self.gateway.start(s.http_listen_address, tls, shared=s.workers > 1)
        self._health_task = asyncio.create_task(self._check_health(), name="health")
        log.info(
            "geminikv serving etcd v3 on %s (revision %d)",
            self.address.grpc_target,
            self.store.revision,
        )

    def _tls(self) -> grpc.ServerCredentials | None:
        """Server TLS from Kine's flags; a trusted CA makes client certificates mandatory."""
        s = self.settings
        if not s.server_cert_file and not s.server_key_file:
            return None
        if not (s.server_cert_file and s.server_key_file):
            raise ValueError("--server-cert-file and --server-key-file go together")
        with open(s.server_key_file, "rb") as key, open(s.server_cert_file, "rb") as cert:
            pair = (key.read(), cert.read())
        ca = None
        if s.trusted_ca_file:
            with open(s.trusted_ca_file, "rb") as f:
                ca = f.read()
        return grpc.ssl_server_credentials(
            [pair], root_certificates=ca, require_client_auth=ca is not None
        )

    def _watch_gauges(self) -> None:
        watch, hub, index = self.watch, self.hub, self.store.index if self.store else None
        assert watch is not None and hub is not None and index is not None
        metrics.WATCH_STREAMS.set_function(lambda: len(watch.streams))
        metrics.WATCHERS.set_function(lambda: len(hub.synced) + len(hub.unsynced))
        metrics.UNSYNCED_WATCHERS.set_function(lambda: len(hub.unsynced))
        metrics.REVISION.set_function(lambda: index.revision_of(index.rev))
        metrics.COMPACT_REVISION.set_function(lambda: int(index.compact_revision))
        metrics.LEASES.set_function(lambda: self.lease_count)

    async def _check_health(self) -> None:
        """Every second: the loop is alive, PostgreSQL answers, the index is caught up."""
        assert self.store is not None and self.leases is not None
        last_size = last_count = 0.0
        while True:
            now = time.monotonic()
            self.health.loop_beat = now
            metrics.TASKS.set(len(asyncio.all_tasks()))
            try:
                async with asyncio.timeout(2.0):
                    rev = await self.store.reads.read()
                self.health.database_ok = time.monotonic()
                self.health.caught_up = self.store.follower.applied >= rev
                await self.store.alarms.refresh()
                if self.members is not None:
                    await self.members.announce()
                if now - last_size > 30:
                    metrics.DB_SIZE.set(await self.store.db_size())
                    last_size = now
                if now - last_count >= LEASE_COUNT_INTERVAL:
                    self.lease_count = await self.leases.count()
                    last_count = now
            except Exception as err:
                log.warning("health check: PostgreSQL not answering (%r)", err)
                self.health.caught_up = False
            await asyncio.sleep(1.0)

    async def _identity(self) -> Identity:
        assert self.writer_conn is not None
        name, table_oid = await kine.identity(self.writer_conn)
        cluster = _id64("cluster", name, str(table_oid))
        name = self.settings.name
        return Identity(cluster, member_id(self.settings), name, self.address.client_url)

    async def stop(self) -> None:
        # Stop accepting calls, let unary calls in flight finish (the writer still runs),
        # and end watch streams so the server can drain; the gateway first, a client of it.
        if self.gateway is not None:
            await self.gateway.stop()
            self.gateway = None
        if self._gateway_dir is not None:
            shutil.rmtree(self._gateway_dir, ignore_errors=True)
        draining = None
        if self.servers is not None:
            draining = asyncio.create_task(self.servers.stop(grace=5))
            await asyncio.sleep(0)
        if self.watch is not None:
            await self.watch.stop()
        if draining is not None:
            await draining
            self.servers = None
        await tasks.stop(self._health_task)
        if self.members is not None and self.pool is not None:
            with contextlib.suppress(Exception):  # else its row ages out of the list
                await asyncio.wait_for(self.members.withdraw(), 2)
        if self.heartbeat is not None:
            await self.heartbeat.stop()
        if self.http is not None:
            await asyncio.to_thread(self.http.shutdown)  # blocks up to its poll interval
            self.http.server_close()
        if self.hub is not None:
            await self.hub.stop()
        if self.auth is not None:
            await self.auth.stop()
        if self.leader is not None:
            await self.leader.stop()
        if self.store is not None:
            await self.store.stop()
        if self.pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pool.close(), 5)
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self.store.session.close()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)


def return_large_blocks_to_the_system() -> None:
    """glibc raises its mmap threshold whenever a large block is freed (up to 32 MiB); from
    then on values of a MiB come from the heap, where one small live object above them (a
    heartbeat's row, say) keeps the heap from shrinking: a 100 MiB list left ~70 MiB
    behind. A fixed threshold keeps large blocks in mmap, given back when freed."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: its allocator has its own policy
    libc.mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def settle_gc() -> None:
    """Once serving: what start-up made (modules, the loaded index) lives as long as the
    process, so freeze it out of every collection, and collect young objects less often.
    Under creates this took the collector from 9.9 to 2.0 us of CPU per request, and
    full collections (20 ms pauses, 1.4 a second) went away."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD)


async def serve(settings: Settings, serving: Callable[[], None] | None = None) -> None:
    """Run one geminikv process until SIGTERM or SIGINT; ``serving`` is told once it
    serves (a worker tells its supervisor)."""
    app = App(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return_large_blocks_to_the_system()
    try:
        await app.start()
        settle_gc()
        # the process's own: not in App, which the tests also run in a thread of theirs
        scheduling.helpers_batch()  # gRPC's threads and the metrics server's run now
        if serving is not None:
            serving()
        await stop.wait()
        log.info("shutting down (pid %d)", os.getpid())
    finally:
        await app.stop()
