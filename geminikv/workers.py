"""Several serving processes on one address (``--workers N``) and their supervisor.

Python serves gRPC on one core per process, so N workers, each a whole geminikv (its own
index, value cache, PostgreSQL connections and event loop), listen on the one gRPC
address with SO_REUSEPORT and the kernel spreads connections over them. They share the
database as separate geminikv processes always could: writes are serialised by the
writer lock, each index follows the table through NOTIFY, and the leader lock
(leader.py) makes exactly one of them expire leases and compact.

The supervisor (the process the operator started) serves nothing itself:

* it starts the embedded PostgreSQL when there is no --endpoint, and gives the workers
  its address; it stops it last;
* it checks the address is free first (the workers share it with each other only, so a
  second server on a busy port still fails), then starts worker 0 and, once it serves
  (it has made the schema), the others;
* a worker that exits before serving (a bad setting, a certificate it cannot read) stops
  the whole server with exit code 1, as a single process would; a worker that dies while
  serving (an OOM kill, a crash) is started again after WORKER_RESTART_DELAY, the others
  serving meanwhile: its clients reconnect, and land on a live worker;
* SIGTERM or SIGINT stops every worker (SIGTERM: each drains as a single process does),
  SIGKILL after WORKER_STOP_TIMEOUT; a worker whose supervisor is killed gets SIGTERM
  from the kernel (PR_SET_PDEATHSIG), so none is left behind.

Worker i (from 0) serves /metrics, /healthz and /readyz on the metrics port + i: each
has its own figures (its index, its watchers, whether it leads). The HTTP gateway
(--http-listen-address) is served by every worker on the one address, as gRPC is.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import FrameType

from geminikv import log as logsetup
from geminikv.config import WORKER_RESTART_DELAY, WORKER_STOP_TIMEOUT, Settings

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)
_POLL = 0.25  # seconds between the supervisor's looks at its stop flag


def count(workers: int) -> int:
    """The number of workers ``--workers`` asks for: 0 is one per CPU this process may
    run on."""
    if workers > 0:
        return workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def metrics_address(address: str, number: int) -> str:
    """Worker ``number``'s metrics address: the port + ``number`` (0, or off, as given)."""
    if address in ("", "0"):
        return address
    host, _, port = address.rpartition(":")
    if int(port) == 0:
        return address
    return f"{host}:{int(port) + number}"


def check_address(listen_address: str) -> None:
    """Refuse an address the workers cannot share, or one already in use (by anyone:
    the workers' SO_REUSEPORT would let them join another server's socket)."""
    from geminikv.server.app import parse_listen_address
    from geminikv.server.listeners import check_free

    target = parse_listen_address(listen_address).grpc_target
    if target.startswith("unix:"):
        raise ValueError("--workers above 1 needs a TCP --listen-address (not unix://)")
    if int(target.rpartition(":")[2]) == 0:
        raise ValueError("--workers above 1 needs a fixed port in --listen-address (not 0)")
    check_free(target)


def worker_main(settings: Settings, number: int, supervisor: int, ready: Connection) -> None:
    """A worker process: one geminikv serving on the shared address."""
    with contextlib.suppress(OSError, AttributeError):  # Linux only: else no orphan guard
        ctypes.CDLL("libc.so.6").prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:  # the supervisor died before the line above
        return
    logsetup.setup(settings.log_format, settings.debug, worker=number)
    from geminikv.serve import serve_process

    raise SystemExit(serve_process(settings, lambda: ready.send(os.getpid())))


@dataclass
class Worker:
    number: int
    process: BaseProcess
    ready: Connection  # the supervisor's end: the worker sends its pid once it serves
    serving: bool = False


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dsn = settings.endpoint  # the embedded PostgreSQL's when there is none
        self.workers: dict[int, Worker] = {}
        self.restarts: dict[int, float] = {}  # worker number → when to start it again
        self.stopping = False
        self._context = multiprocessing.get_context("spawn")  # nothing inherited but settings

    def stop(self, signum: int, _frame: FrameType | None) -> None:
        if not self.stopping:
            log.info("%s: stopping %d workers", signal.Signals(signum).name, len(self.workers))
        self.stopping = True

    def start(self, number: int) -> Worker:
        s = self.settings
        settings = replace(
            s,
            endpoint=self.dsn,
            metrics_bind_address=metrics_address(s.metrics_bind_address, number),
        )
        mine, theirs = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=worker_main,
            args=(settings, number, os.getpid(), theirs),
            name=f"geminikv-worker-{number}",
        )
        process.start()
        theirs.close()
        worker = Worker(number, process, mine)
        self.workers[number] = worker
        log.info("worker %d started (pid %d)", number, process.pid)
        return worker

    def run(self) -> int:
        """Start the workers and keep them running until told to stop; the exit code."""
        n = self.settings.workers
        if self.stopping:
            return 0
        self.start(0)
        pending = list(range(1, n))  # started once worker 0 serves
        while not self.stopping:
            if pending and self.workers[0].serving:
                for number in pending:
                    self.start(number)
                pending = []
            now = time.monotonic()
            for number, when in list(self.restarts.items()):
                if when <= now:
                    del self.restarts[number]
                    self.start(number)
            failed = self._watch()
            if failed is not None:
                return failed
        return 0

    def _watch(self) -> int | None:
        """Wait a moment for news from the workers; an exit code if the server must end."""
        waiting: list[object] = [w.process.sentinel for w in self.workers.values()]
        waiting += [w.ready for w in self.workers.values() if not w.serving]
        news = multiprocessing.connection.wait(waiting, _POLL)  # type: ignore[arg-type]
        for worker in list(self.workers.values()):
            if worker.ready in news and not worker.serving:
                with contextlib.suppress(EOFError, OSError):  # EOF: it died (below)
                    worker.ready.recv()
                    worker.serving = True
                    log.info("worker %d serving (pid %d)", worker.number, worker.process.pid)
                    everyone = len(self.workers) == self.settings.workers
                    if everyone and all(w.serving for w in self.workers.values()):
                        log.info("all %d workers serving", len(self.workers))
            if worker.process.is_alive() or self.stopping:
                continue
            code = worker.process.exitcode
            worker.ready.close()
            del self.workers[worker.number]
            if not worker.serving:
                log.error("worker %d exited with code %s before serving", worker.number, code)
                return 1
            log.warning(
                "worker %d (pid %d) exited with code %s; starting it again in %gs",
                worker.number,
                worker.process.pid,
                code,
                WORKER_RESTART_DELAY,
            )
            self.restarts[worker.number] = time.monotonic() + WORKER_RESTART_DELAY
        return None

    def stop_all(self) -> None:
        """SIGTERM to every worker, SIGKILL to those still running after the timeout."""
        for worker in self.workers.values():
            if worker.process.is_alive():
                worker.process.terminate()
        deadline = time.monotonic() + WORKER_STOP_TIMEOUT
        for worker in self.workers.values():
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                log.warning("worker %d did not stop in time: killing it", worker.number)
                worker.process.kill()
                worker.process.join()
            worker.ready.close()
        self.workers.clear()


def supervise(settings: Settings) -> int:
    """Run ``settings.workers`` workers until SIGTERM or SIGINT; the exit code."""
    from geminikv.storage.embedded import EmbeddedPostgres, EmbeddedPostgresError

    try:
        check_address(settings.listen_address)
    except (OSError, ValueError) as err:
        log.error("%s", err)
        return 1
    supervisor = Supervisor(settings)
    embedded = None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, supervisor.stop)
    try:
        if not supervisor.dsn:
            embedded = EmbeddedPostgres(settings.data_dir)
            supervisor.dsn = embedded.start()
        log.info(
            "geminikv starting %d workers on %s (pid %d supervises)",
            settings.workers,
            settings.listen_address,
            os.getpid(),
        )
        return supervisor.run()
    except (EmbeddedPostgresError, OSError) as err:
        log.error("%s", err)
        return 1
    finally:
        supervisor.stop_all()
        if embedded is not None:
            embedded.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("stopped")
