"""Running the application under uvicorn: listening (one or many workers), or on one inherited connection."""

from __future__ import annotations

import asyncio
import logging
import logging.config
import os
import signal
import socket
import stat
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import uvicorn
import uvloop
from uvicorn.server import ServerState

from . import keyfiles
from .accesslog import AccessLog
from .app import TangApplication
from .keystore import KeyStore
from .protocol import TangHttpProtocol
from .settings import ENVIRONMENT_VARIABLE, MULTIPROCESS_ENVIRONMENT, Settings

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
        },
    }


def build_application(settings: Settings) -> TangApplication:
    from .metrics import Metrics  # imported here: after the multiprocess directory is in the environment

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
        "tang_server.server:create_app",
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
        limit_concurrency=settings.max_connections,
    )


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
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it to the previous handler: make that an exit
    # with status 0, as service managers and `tangd` users expect from a clean stop.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    config = uvicorn_config(settings)
    server = uvicorn.Server(config)
    if settings.workers > 1:
        from uvicorn.supervisors import Multiprocess

        Multiprocess(config, sockets=[config.bind_socket()]).run()
    else:
        server.run()


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def serve_connection(settings: Settings) -> None:
    """Serve the HTTP connection on standard input and output, then exit (systemd Accept=yes, inetd, socat)."""
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
    uvloop.run(_serve_one(config, connection))
    if output is not None:
        # The bridge copies the last answer to standard output after the connection closed: let it finish.
        output.join(timeout=10)


async def _serve_one(config: uvicorn.Config, connection: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()

    def stop() -> None:
        if not finished.done():
            finished.set_result(None)

    class OneConnection(TangHttpProtocol):
        """The inherited connection: when it ends, the process ends."""

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
    while data := os.read(0, 65536):
        bridge.sendall(data)
    bridge.shutdown(socket.SHUT_WR)


def _pump_out(bridge: socket.socket) -> None:
    while data := bridge.recv(65536):
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
