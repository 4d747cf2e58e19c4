"""Running the application under uvicorn: listening (one or many workers), or on one inherited connection.

Stopping drops nothing received. Each serving process (the only one, or each worker) goes through:

    SERVING --SIGTERM or SIGINT--> DRAINING: /readyz answers 503 at once; the listener still accepts and every
        request is served, for --drain-seconds, so that load balancers see the replica not ready and take it out
    --> CLOSING (uvicorn's shutdown): the listener closes; each connection answers every request it has
        received, pipelined or not, on the direct or the general path, then closes (`TangHttpProtocol.shutdown`);
        idle ones close at once; after `closing_seconds` (a request arriving at the close has its whole
        --request-timeout) whatever is left is cut
    --> exit with status 0.

A second SIGINT (Ctrl+C twice) ends the drain window at once; what was received is still answered.

Connections handed over by `tangd` (inetd mode, `handoff.py`) arrive on a Unix control socket; each serving
process adopts them as uvicorn connections, so they are served, counted, logged and drained like accepted ones.
SIGTERM removes the control socket's file (new `tangd`s serve their connection themselves); the CLOSING step stops
taking hand-overs before the listener closes.
"""

from __future__ import annotations

import asyncio
import logging
import logging.config
import math
import multiprocessing
import multiprocessing.queues
import os
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple

import uvicorn
import uvloop
from uvicorn.config import STARTUP_FAILURE
from uvicorn.server import ServerState

from tang_server.http.accesslog import AccessLog
from tang_server.http.app import TangApplication
from tang_server.http.protocol import TangHttpProtocol
from tang_server.keys import keyfiles
from tang_server.keys.keystore import KeyStore
from tang_server.serving import handoff, handoff_listener, systemd
from tang_server.serving.handoff_listener import HandoffListener
from tang_server.settings import ENVIRONMENT_VARIABLE, MULTIPROCESS_ENVIRONMENT, Settings

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_config(settings: Settings) -> dict[str, Any]:
    """uvicorn's logging, with timestamps on every line (the reference's lines have none)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": LOG_FORMAT}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
        "loggers": {
            "tang_server": {"handlers": ["stderr"], "level": settings.log_level.upper(), "propagate": False},
            "uvicorn": {"handlers": ["stderr"], "level": settings.log_level.upper(), "propagate": False},
            # The same level again, explicitly: uvicorn's protocol compares this logger's own `level` (0 when
            # unset) with its TRACE level, and would format and log a discarded line for every connection.
            "uvicorn.error": {"level": settings.log_level.upper()},
        },
    }


def build_application(settings: Settings) -> TangApplication:
    from tang_server.ops.metrics import Metrics  # imported here: after the multiprocess directory is in the environment

    TangHttpProtocol.configure(settings.request_timeout, settings.max_target_bytes, settings.max_header_bytes)
    metrics = Metrics()
    store = KeyStore(
        settings.keys_dir,
        auto_keygen=settings.auto_keygen,
        recheck_seconds=settings.recheck_seconds,
        listener=metrics,
    )
    access_log = AccessLog(fmt=settings.access_log_format) if settings.access_log else None
    return TangApplication(store, settings, access_log, metrics)


def create_app() -> TangApplication:
    """uvicorn's application factory in each worker process; settings come from the environment."""
    return build_application(Settings.from_environment())


def uvicorn_config(settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        "tang_server.serving.server:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        uds=settings.uds,
        workers=settings.workers,
        loop="uvloop",
        http=TangHttpProtocol,
        lifespan="off",
        server_header=False,
        access_log=False,  # ours (accesslog.py): timestamped, and an order of magnitude cheaper
        log_config=log_config(settings),
        proxy_headers=False,
        timeout_keep_alive=int(max(1, settings.keep_alive_seconds)),
        # uvicorn counts the connection asking among its connections (503 when there are `limit` or more):
        # one more, so that `--max-connections N` serves N connections at once and the next one gets 503.
        limit_concurrency=None if settings.max_connections is None else settings.max_connections + 1,
        timeout_graceful_shutdown=closing_seconds(settings),
    )


def closing_seconds(settings: Settings) -> int:
    """How long the listener may stay closed before what is left is cut: a request whose first bytes arrived just
    before has its whole deadline to arrive, then its answer takes milliseconds. (A 408 at that deadline has gone
    out when its lingering close is cut.)"""
    return math.ceil(settings.request_timeout) + 2


def stop_bound(settings: Settings) -> float:
    """Seconds from SIGTERM to the exit of every process, at most (the Helm chart's grace period exceeds it)."""
    return settings.drain_seconds + closing_seconds(settings) + 1


class Handoff(NamedTuple):
    """The control socket `tangd` hands connections to (`handoff.py`); `owner`: this process removes its file."""

    sock: socket.socket
    path: str
    inode: int
    owner: bool

    def remove(self) -> None:
        if self.owner:
            handoff_listener.unlink(self.path, self.inode)


def bind_handoff(settings: Settings) -> Handoff | None:
    """The control socket for this key directory, or None when turned off or impossible (logged, not fatal)."""
    if settings.handoff_socket == "":
        return None
    path = settings.handoff_socket or handoff.default_socket_path(str(settings.keys_dir))
    try:
        sock, inode = handoff_listener.bind(path)
    except OSError as exc:
        logger.warning("not taking connections from tangd: cannot listen on %s: %s", path, exc)
        return None
    logger.info("taking connections from tangd on %s", path)
    return Handoff(sock, path, inode, owner=True)


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the drain window between the signal and the shutdown (module docstring).

    `on_ready` is called with the served key-set digest once the server listens with its keys loaded (the
    service manager's READY=1, or the supervisor's count of ready workers); `notifier` is told when it stops.
    SIGHUP re-reads the key directory (`systemctl reload`), for changes no inotify event reports. `handoff`: the
    control socket on which this process also takes connections from `tangd`.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        drain_seconds: float,
        *,
        on_ready: Callable[[str], None] | None = None,
        notifier: systemd.Notifier | None = None,
        handoff: Handoff | None = None,
    ) -> None:
        super().__init__(config)
        self.drain_seconds = drain_seconds
        self.drain_ends: float | None = None
        self.on_ready = on_ready
        self.notifier = notifier
        self.handoff = handoff
        self.handoff_listener: HandoffListener | None = None

    def _application(self) -> TangApplication | None:
        app = self.config.loaded_app if self.config.loaded else None
        return app if isinstance(app, TangApplication) else None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        app = self._application()
        if not self.started or app is None:
            return
        signal.signal(signal.SIGHUP, lambda sig, frame: _recheck_in_background(app.store))
        if self.handoff is not None:
            self.handoff_listener = HandoffListener(
                self.handoff.sock, app.settings.keys_dir, app.settings.prefix, self._adopt
            )
        if self.on_ready is not None:
            self.on_ready(app.store.keyset.digest)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_ends is not None:
            # Repeated (a process group signalled, then the supervisor forwarding it): not a reason to hurry,
            # except a second Ctrl+C. uvicorn would force the exit and drop what is in flight.
            if sig == signal.SIGINT:
                self.drain_ends = time.monotonic()
            return
        self.drain_ends = time.monotonic() + self.drain_seconds
        if self.handoff is not None:
            self.handoff.remove()  # new tangds serve their connection themselves
        if self.notifier is not None:
            self.notifier.stopping()
        app = self._application()
        if app is not None:
            app.draining = True
        logger.info("%s: not ready, closing the listener in %gs", signal.Signals(sig).name, self.drain_seconds)
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        stop = await super().on_tick(counter)
        if stop and self.drain_ends is not None and time.monotonic() < self.drain_ends:
            return False  # draining: keep accepting
        return stop

    async def _adopt(self, connection: socket.socket) -> None:
        """Serve a connection handed over by tangd exactly as one the listener accepted (see uvicorn's startup)."""
        config = self.config

        def create_protocol() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )

        await asyncio.get_running_loop().connect_accepted_socket(create_protocol, connection)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.handoff_listener is not None:
            await self.handoff_listener.stop()  # before the listener closes, so its connections are shut down too
        connections = list(self.server_state.connections)
        answering = sum(1 for c in connections if isinstance(c, TangHttpProtocol) and c.answering())
        logger.info("closing the listener: %d connections answering, %d idle", answering, len(connections) - answering)
        began = time.monotonic()
        await super().shutdown(sockets)
        left = len(self.server_state.connections)
        logger.info("closed: answered what was received in %.2fs; %d connections cut", time.monotonic() - began, left)


def _recheck_in_background(store: KeyStore) -> None:
    logger.info("SIGHUP: re-reading the key directory")
    threading.Thread(target=store.recheck, name="tang-sighup", daemon=True).start()


def prepare_metrics_directory(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    for path in directory.glob("*.db"):  # a previous run's counters would add up with ours
        path.unlink()


def serve(settings: Settings) -> None:
    """Listen on a TCP port or a Unix socket with `settings.workers` processes until SIGTERM or SIGINT."""
    logging.config.dictConfig(log_config(settings))
    if settings.auto_keygen:
        # First start: create the directory and a pair here, before the workers start, rather than racing.
        settings.keys_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        for path in keyfiles.ensure_keys(settings.keys_dir):
            logger.info("generated key %s", path.name)
    for problem in keyfiles.permission_problems(settings.keys_dir):
        logger.warning("%s", problem)
    metrics_dir = Path(settings.metrics_dir or tempfile.mkdtemp(prefix="tang-server-metrics-"))
    prepare_metrics_directory(metrics_dir)
    os.environ[MULTIPROCESS_ENVIRONMENT] = str(metrics_dir)
    os.environ[ENVIRONMENT_VARIABLE] = settings.to_environment()
    _exit_cleanly_on_signals()
    # Sockets passed by systemd (a .socket unit, or systemd-socket-activate) replace --host, --port and --uds.
    passed = systemd.listen_sockets()
    notifier = systemd.Notifier.from_environment()
    config = uvicorn_config(settings)
    control = bind_handoff(settings)
    try:
        if settings.workers > 1:
            Workers(config, passed or [config.bind_socket()], settings, notifier, control).run()
        else:
            DrainingServer(
                config, settings.drain_seconds, on_ready=notifier.ready, notifier=notifier, handoff=control
            ).run(passed or None)
    finally:
        if control is not None:
            control.remove()


def _exit_cleanly_on_signals() -> None:
    # uvicorn stops gracefully on SIGTERM or SIGINT, then re-raises the signal to the previous handler: make that
    # an exit with status 0, as service managers and `tangd` users expect from a clean stop.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    signal.signal(signal.SIGINT, _exit_cleanly)


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


class Workers:
    """`config.workers` processes serving the same listening sockets, each a `DrainingServer`.

    uvicorn's `Multiprocess` reduced to what we use, since its workers run uvicorn's own `Server`, which does not
    drain. SIGTERM and SIGINT are forwarded to the workers at once (readiness must fail at once); a worker that
    dies while serving is replaced. Once the workers are told to stop, this process closes its own copy of the
    sockets, so that the listener really closes when the last worker closes its copy (else the kernel would keep
    completing connections that nobody accepts).
    """

    def __init__(
        self,
        config: uvicorn.Config,
        sockets: list[socket.socket],
        settings: Settings,
        notifier: systemd.Notifier | None = None,
        handoff: Handoff | None = None,
    ) -> None:
        self.config = config
        self.sockets = sockets
        self.handoff = handoff
        self.drain_seconds = settings.drain_seconds
        self.bound = stop_bound(settings)
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self.stopping = False
        self.notifier = notifier
        #: Workers report (pid, digest) once they serve; the service is ready when every first worker has.
        self.ready_queue = _SPAWN.SimpleQueue()
        self.ready: dict[int, str] | None = {}

    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._signalled)
        signal.signal(signal.SIGHUP, lambda sig, frame: self._forward(signal.SIGHUP))
        self.processes = [self._spawn() for _ in range(self.config.workers)]
        while not self.stopping:
            time.sleep(0.1 if self.ready is not None else 0.5)
            self._collect_ready()
            for index, process in enumerate(self.processes):
                if process.exitcode is None or self.stopping:
                    continue
                if process.exitcode == STARTUP_FAILURE:
                    logger.error("worker %s failed to start; stopping", process.pid)
                    self._signalled(signal.SIGTERM, None)
                    break
                logger.error("worker %s died (exit %s); starting another", process.pid, process.exitcode)
                self.processes[index] = self._spawn()
        self._forward(signal.SIGTERM)  # again, for a worker started as the signal came
        for sock in self.sockets:
            sock.close()
        if self.handoff is not None:
            self.handoff.sock.close()
        deadline = time.monotonic() + self.bound
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                logger.error("worker %s still running %gs after the signal: killed", process.pid, self.bound)
                process.kill()
                process.join()

    def _collect_ready(self) -> None:
        while not self.ready_queue.empty():
            pid, digest = self.ready_queue.get()
            if self.ready is not None:
                self.ready[pid] = digest
        if self.ready is not None and all(process.pid in self.ready for process in self.processes):
            digests = set(self.ready.values())
            self.ready = None  # said once; replaced workers do not make the service ready again
            if self.notifier is not None:
                self.notifier.ready(" ".join(sorted(digests)))

    def _signalled(self, sig: int, frame: FrameType | None) -> None:
        if not self.stopping:
            logger.info("%s: stopping %d workers", signal.Signals(sig).name, len(self.processes))
            if self.notifier is not None:
                self.notifier.stopping()
            if self.handoff is not None:
                self.handoff.remove()
        repeated, self.stopping = self.stopping, True
        self._forward(signal.SIGINT if repeated and sig == signal.SIGINT else signal.SIGTERM)

    def _forward(self, sig: int) -> None:
        for process in list(self.processes):
            if process.pid is not None and process.exitcode is None:
                os.kill(process.pid, sig)

    def _worker_handoff(self) -> Handoff | None:
        return None if self.handoff is None else self.handoff._replace(owner=False)

    def _spawn(self) -> multiprocessing.process.BaseProcess:
        process = _SPAWN.Process(
            target=_serve_worker,
            args=(self.config, self.sockets, self.drain_seconds, os.getpid(), self.ready_queue, self._worker_handoff()),
            daemon=False,
        )
        process.start()
        return process


_SPAWN = multiprocessing.get_context("spawn")
_PR_SET_PDEATHSIG = 1


def _serve_worker(
    config: uvicorn.Config,
    sockets: list[socket.socket],
    drain_seconds: float,
    parent: int,
    ready_queue: multiprocessing.queues.SimpleQueue[tuple[int, str]],
    handoff: Handoff | None = None,
) -> None:
    """A worker process: drain when the supervisor says so, or when it dies (SIGKILL gives it no chance to)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        return  # the supervisor died before the line above: nobody to serve for
    config.configure_logging()
    _exit_cleanly_on_signals()
    DrainingServer(
        config, drain_seconds, on_ready=lambda digest: ready_queue.put((os.getpid(), digest)), handoff=handoff
    ).run(sockets)


def serve_connection(settings: Settings, received: bytes = b"") -> None:
    """Serve the HTTP connection on standard input and output, then exit (systemd Accept=yes, inetd, socat).
    `received`: what was read from standard input already (by `oneshot.py`) and not answered."""
    logging.config.dictConfig(log_config(settings))
    application = build_application(settings)
    config = uvicorn.Config(
        application,
        loop="uvloop",
        http=TangHttpProtocol,
        lifespan="off",
        server_header=False,
        access_log=False,
        log_config=log_config(settings),
    )
    config.load()
    connection, output = _connection_socket()
    uvloop.run(_serve_one(config, connection, received))
    if output is not None:
        # The bridge copies the last answer to standard output after the connection closed: let it finish.
        output.join(timeout=10)


async def _serve_one(config: uvicorn.Config, connection: socket.socket, received: bytes = b"") -> None:
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()

    def stop() -> None:
        if not finished.done():
            finished.set_result(None)

    class OneConnection(TangHttpProtocol):
        """The inherited connection: when it ends, the process ends."""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if received:
                self.data_received(received)  # first, before anything the transport reads

        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            stop()

    loop.add_signal_handler(signal.SIGTERM, stop)
    protocol = OneConnection(config=config, server_state=ServerState(), app_state={})
    await loop.connect_accepted_socket(lambda: protocol, connection)
    await finished
    if not protocol.transport.is_closing():
        protocol.transport.close()  # stopped by a signal: end the connection, which ends the output bridge


def _connection_socket() -> tuple[socket.socket, threading.Thread | None]:
    """Standard input as a socket: itself when it is one (systemd, inetd), else a bridge to the pipes (socat),
    returned with the thread that copies the answers to standard output."""
    if stat.S_ISSOCK(os.fstat(0).st_mode):
        return socket.socket(fileno=os.dup(0)), None
    ours, theirs = socket.socketpair()
    threading.Thread(target=_pump_in, args=(theirs,), daemon=True).start()
    output = threading.Thread(target=_pump_out, args=(theirs,), daemon=True)
    output.start()
    return ours, output


def _pump_in(bridge: socket.socket) -> None:
    try:
        while data := os.read(0, 65536):
            bridge.sendall(data)
        bridge.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the connection has ended (closed after a refusal, say): what the client still sends goes nowhere


def _pump_out(bridge: socket.socket) -> None:
    while data := bridge.recv(65536):
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    # Our end of the connection, as a socket would show it at once: standard output is closed now, not when the
    # process exits (after a refusal, the lingering close goes on reading the client for up to LINGER_SECONDS).
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
