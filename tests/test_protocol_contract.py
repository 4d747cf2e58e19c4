"""Our protocol subclass in-process against a fake transport, as uvicorn tests its own (tests/protocols/test_http.py).

`protocol.py` extends uvicorn's `HttpToolsProtocol` and `server.py` extends `uvicorn.Server`; neither is a
documented API. These tests pin what we rely on (inherited attributes, the order of the parser callbacks, how a
cycle ends, what the server calls at shutdown) so that a uvicorn upgrade that changes any of it fails here, loudly,
rather than in production. Written against uvicorn 0.54.0 and httptools 0.9.0.
"""

from __future__ import annotations

import asyncio
import logging
import logging.config
import re
import signal
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import uvloop
from uvicorn.logging import TRACE_LOG_LEVEL
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.utils import get_local_addr, get_remote_addr
from uvicorn.server import ServerState

from tang_server.http.app import TangApplication
from tang_server.http.protocol import LINGER_SECONDS, TangHttpProtocol
from tang_server.keys.keystore import KeyStore
from tang_server.serving.server import DrainingServer, log_config, uvicorn_config
from tang_server.settings import Settings

from .support import statuses

ADV = b"GET /adv HTTP/1.1\r\nHost: t\r\n\r\n"
ADV_GENERAL = b"GET /adv HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n\r\n"  # the same, on the ASGI path
HEALTH = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"


class MockTransport:
    """What uvicorn's own protocol tests use: records writes, closing and reading pauses."""

    def __init__(self) -> None:
        self.buffer = b""
        self.writes = 0
        self.closed = False
        self.read_paused = False

    def get_extra_info(self, key: str) -> Any:
        return {"sockname": ("127.0.0.1", 7500), "peername": ("127.0.0.1", 40000)}.get(key)

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.buffer += data
        self.writes += 1

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.read_paused = True

    def resume_reading(self) -> None:
        self.read_paused = False

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        pass

    def take(self) -> bytes:
        data, self.buffer = self.buffer, b""
        return data


@pytest.fixture
def app(keys: Path) -> Iterator[TangApplication]:
    store = KeyStore(keys, auto_keygen=False)
    yield TangApplication(store, Settings(keys_dir=keys))
    store.close()


def run(
    test: Callable[[TangHttpProtocol, MockTransport], Awaitable[None]],
    app: TangApplication,
    protocol_class: type[TangHttpProtocol] = TangHttpProtocol,
    transport_class: type[MockTransport] = MockTransport,
) -> None:
    async def main() -> None:
        config = uvicorn.Config(app, http=protocol_class, lifespan="off", server_header=False, log_config=None,
                                proxy_headers=False)  # fmt: skip  # as server.py: the app itself, unwrapped
        config.load()
        protocol = protocol_class(config=config, server_state=ServerState(), app_state={})
        transport = transport_class()
        protocol.connection_made(transport)  # type: ignore[arg-type]
        try:
            await test(protocol, transport)
        finally:
            protocol.connection_lost(None)

    asyncio.run(main())


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until `condition` (a bound against a hang, not a timing assertion)."""
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.001)


def test_inherited_state_we_rely_on(app: TangApplication) -> None:
    """The attributes protocol.py reads or writes on uvicorn's protocol, with the types it expects."""

    async def test(protocol: TangHttpProtocol, transport: MockTransport) -> None:
        assert protocol.transport is transport  # type: ignore[comparison-overlap]
        assert isinstance(protocol.flow, FlowControl)
        assert isinstance(protocol.pipeline, deque) and not protocol.pipeline
        assert protocol.cycle is None and protocol.app is app
        assert protocol in protocol.connections and isinstance(protocol.tasks, set)
        assert protocol.connections is protocol.server_state.connections
        assert protocol.limit_concurrency is None and protocol.client == ("127.0.0.1", 40000)
        assert isinstance(protocol.loop, asyncio.AbstractEventLoop)
        assert isinstance(protocol.server_state.default_headers, list)
        protocol.data_received(b"POST /rec/x HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        assert protocol.url == b"/rec/x"
        assert protocol.headers == [(b"content-length", b"2"), (b"expect", b"100-continue")]
        assert protocol.expect_100_continue is True
        assert protocol.scope["extensions"]["tang.raw_target"] == b"/rec/x"
        assert isinstance(protocol.cycle, RequestResponseCycle) and protocol.tasks  # the general path's task
        assert protocol.cycle.keep_alive is True and protocol.cycle.response_complete is False
        assert protocol.parser.get_method() == b"POST" and protocol.parser.should_keep_alive()
        assert STATUS_LINE[200] == b"HTTP/1.1 200 OK\r\n"
        protocol.data_received(b"{}")
        await until(lambda: protocol.cycle.response_complete)

    run(test, app)


def test_our_init_sets_what_uvicorn_s_sets(app: TangApplication, keys: Path) -> None:
    """`TangHttpProtocol.__init__` is uvicorn's with the loggers looked up once per process: under the configuration
    our server builds, every attribute uvicorn's own `__init__` sets, with the same value."""
    config = uvicorn_config(Settings(keys_dir=keys, keep_alive_seconds=7, max_connections=9))  # not the defaults
    config.app, config.factory = app, False  # the application itself, not the factory that reads the environment
    config.load()

    async def main() -> None:
        loop, state = asyncio.get_running_loop(), ServerState()
        ours = vars(TangHttpProtocol(config=config, server_state=state, app_state={}, _loop=loop))
        theirs = vars(HttpToolsProtocol(config=config, server_state=state, app_state={}, _loop=loop))
        assert ours.keys() == theirs.keys()
        assert type(ours.pop("parser")) is type(theirs.pop("parser"))
        assert ours == theirs
        assert theirs["access_log"] is False and theirs["logger"] is logging.getLogger("uvicorn.error")

    asyncio.run(main())


def test_parser_callback_order(app: TangApplication) -> None:
    """httptools calls the protocol back in this order, per request, within one `data_received`."""
    calls: list[str] = []
    names = ("on_message_begin", "on_url", "on_header", "on_headers_complete", "on_body", "on_message_complete")

    class Recording(TangHttpProtocol):
        pass

    for name in names:

        def recorder(self: Any, *args: Any, _name: str = name) -> None:
            calls.append(_name)
            getattr(TangHttpProtocol, _name)(self, *args)

        setattr(Recording, name, recorder)

    async def test(protocol: TangHttpProtocol, transport: MockTransport) -> None:
        protocol.data_received(b"POST /rec/x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}" + ADV)
        await until(lambda: len(statuses(transport.buffer)) == 2)

    run(test, app, Recording)
    first = ["on_message_begin", "on_url", "on_header", "on_header", "on_headers_complete", "on_body"]
    assert calls == [*first, "on_message_complete", "on_message_begin", "on_url", "on_header",
                     "on_headers_complete", "on_message_complete"]  # fmt: skip


def test_direct_answer_is_one_write_and_the_bytes_of_the_general_path(app: TangApplication) -> None:
    async def test(protocol: TangHttpProtocol, transport: MockTransport) -> None:
        protocol.data_received(ADV)
        assert protocol.cycle is None, "no ASGI cycle for a direct request"
        await until(lambda: bool(transport.buffer))
        direct, writes = transport.take(), transport.writes
        protocol.data_received(ADV_GENERAL)
        await until(lambda: protocol.cycle is not None and protocol.cycle.response_complete)
        general = transport.take()
        assert writes == 1
        assert direct == general.replace(b"HTTP/1.1 100 Continue\r\n\r\n", b"")

    run(test, app)


def test_direct_answers_carry_the_date_of_the_second_they_leave_in(app: TangApplication) -> None:
    """The direct path remembers the last answer's bytes (`direct.RememberedAnswerBytes`): a new `default_headers`
    (uvicorn's once-a-second Date) or a different answer must be laid out again."""

    async def test(protocol: TangHttpProtocol, transport: MockTransport) -> None:
        state = protocol.server_state
        answers = []
        for date in (None, b"Mon, 07 Dec 2026 10:00:00 GMT", None, b"Mon, 07 Dec 2026 10:00:01 GMT"):
            if date is not None:
                state.default_headers = [(b"date", date)]  # as uvicorn's `on_tick`: a new list
            for request in (ADV, ADV, b"GET /adv/nonexistent HTTP/1.1\r\nHost: t\r\n\r\n", ADV):
                protocol.data_received(request)
                await until(lambda: bool(transport.buffer))
                answers.append(transport.take())
        expected_dates = [b"", b"", b"", b""] + [b"date: Mon, 07 Dec 2026 10:00:00 GMT\r\n"] * 8
        expected_dates += [b"date: Mon, 07 Dec 2026 10:00:01 GMT\r\n"] * 4
        assert [re.search(rb"date: [^\r]*\r\n|$", answer)[0] for answer in answers] == expected_dates  # type: ignore[index]
        assert statuses(b"".join(answers)) == [b"200", b"200", b"404", b"200"] * 4
        # Each answer is what uvicorn writes for it on the general path, with the same headers.
        for answer in answers[12:]:
            protocol.data_received(ADV_GENERAL if b" 200 " in answer else b"GET /adv/nonexistent HTTP/1.1\r\n"
                                   b"Host: t\r\nExpect: 100-continue\r\n\r\n")  # fmt: skip
            await until(lambda: protocol.cycle is not None and protocol.cycle.response_complete)
            assert transport.take().replace(b"HTTP/1.1 100 Continue\r\n\r\n", b"") == answer

    run(test, app)


def test_uvicorn_replaces_the_default_headers_rather_than_changing_them(app: TangApplication) -> None:
    """What `RememberedAnswerBytes` relies on: the server's tick puts a new list in `default_headers` (with the
    Date) instead of changing the one connections already hold, so a list seen before has the same contents."""
    config = uvicorn.Config(app, http=TangHttpProtocol, lifespan="off", log_config=None, proxy_headers=False)
    config.load()
    server = DrainingServer(config, drain_seconds=60)

    async def main() -> None:
        seen = []
        for counter in (0, 10, 20):  # a tick per tenth of a second: the headers are redone every tenth tick
            await server.on_tick(counter)
            seen.append((server.server_state.default_headers, list(server.server_state.default_headers)))
        for headers, contents in seen:
            assert headers == contents and any(name == b"date" for name, _ in headers)
        assert len({id(headers) for headers, _ in seen}) == 3

    asyncio.run(main())


def test_pipelined_answers_in_order_and_reading_resumes(app: TangApplication) -> None:
    """uvicorn queues a request behind a running cycle in `pipeline` and pauses reading; `on_response_complete`
    starts the next one and resumes reading."""

    async def test(protocol: TangHttpProtocol, transport: MockTransport) -> None:
        protocol.data_received(HEALTH + HEALTH + ADV)  # /adv behind a general request takes the general path
        assert len(protocol.pipeline) == 2 and transport.read_paused
        await until(lambda: len(statuses(transport.buffer)) == 3)
        data = transport.take()
        assert data.index(b"application/json") < data.rindex(b"application/json") < data.index(b"jose+json")
        assert not transport.read_paused and not transport.closed

    run(test, app)


def test_uvicorn_shutdown_drops_a_direct_request_ours_answers_it(app: TangApplication) -> None:
    """uvicorn's `shutdown()` closes a connection without a running cycle: a parsed direct request would be lost.
    Ours answers it (`Connection: close`), then closes."""

    async def theirs(protocol: TangHttpProtocol, transport: MockTransport) -> None:
        protocol.data_received(ADV)
        HttpToolsProtocol.shutdown(protocol)
        await asyncio.sleep(0.01)
        assert transport.closed and transport.buffer == b""

    async def ours(protocol: TangHttpProtocol, transport: MockTransport) -> None:
        protocol.data_received(ADV)
        protocol.shutdown()
        assert not transport.closed
        await until(lambda: transport.closed)
        data = transport.take()
        assert statuses(data) == [b"200"] and b"connection: close\r\n" in data

    run(theirs, app)
    run(ours, app)


def test_shutdown_answers_every_pipelined_request_then_closes(app: TangApplication) -> None:
    async def test(protocol: TangHttpProtocol, transport: MockTransport) -> None:
        protocol.data_received(ADV + HEALTH + ADV + ADV)
        protocol.shutdown()
        await until(lambda: transport.closed)
        assert statuses(transport.take()) == [b"200"] * 4

    run(test, app)


def test_pipelined_requests_arriving_after_shutdown_are_all_answered(app: TangApplication) -> None:
    """A partial request holds the connection open through shutdown; the rest arrives with more pipelined
    requests in the same read. Answering the first (when the second begins) must not close the connection: the
    others are already read from the socket, so the kernel shows nothing left (found by tests/test_drain.py)."""

    async def test(protocol: TangHttpProtocol, transport: MockTransport) -> None:
        protocol.data_received(ADV[:10])
        protocol.shutdown()
        protocol.data_received(ADV[10:] + ADV + ADV)
        await until(lambda: transport.closed)
        assert statuses(transport.take()) == [b"200"] * 3

    run(test, app)


def test_shutdown_of_a_general_cycle_says_connection_close(app: TangApplication) -> None:
    """uvicorn writes `connection: close` and closes after the answer when the cycle's `keep_alive` is False."""

    async def test(protocol: TangHttpProtocol, transport: MockTransport) -> None:
        protocol.data_received(HEALTH)
        assert protocol.cycle is not None and not protocol.cycle.response_complete
        protocol.shutdown()
        assert protocol.cycle.keep_alive is False
        await until(lambda: transport.closed)
        data = transport.take()
        assert statuses(data) == [b"200"] and b"connection: close\r\n" in data

    run(test, app)


def test_shutdown_closes_an_idle_connection_and_waits_for_a_partial_request(app: TangApplication) -> None:
    async def idle(protocol: TangHttpProtocol, transport: MockTransport) -> None:
        protocol.data_received(ADV)
        await until(lambda: bool(transport.buffer))
        protocol.shutdown()
        assert transport.closed

    async def partial(protocol: TangHttpProtocol, transport: MockTransport) -> None:
        protocol.data_received(ADV[:10])
        protocol.shutdown()
        await asyncio.sleep(0.01)
        assert not transport.closed
        protocol.data_received(ADV[10:])
        await until(lambda: transport.closed)
        assert statuses(transport.take()) == [b"200"]

    run(idle, app)
    run(partial, app)


def test_draining_direct_answers_close_only_the_last(app: TangApplication) -> None:
    async def test(protocol: TangHttpProtocol, transport: MockTransport) -> None:
        app.draining = True
        protocol.data_received(ADV + ADV)
        await until(lambda: transport.closed)
        data = transport.take()
        assert statuses(data) == [b"200", b"200"] and data.count(b"connection: close\r\n") == 1

    run(test, app)


def test_server_internals_the_drain_relies_on(app: TangApplication, keys: Path) -> None:
    """`DrainingServer` extends `handle_exit`, `on_tick` and `shutdown`; uvicorn's `shutdown` calls each
    connection's `shutdown()` and waits `timeout_graceful_shutdown` for them to close."""
    config = uvicorn.Config(app, http=TangHttpProtocol, lifespan="off", log_config=None, proxy_headers=False,
                            timeout_graceful_shutdown=3)  # fmt: skip
    config.load()
    server = DrainingServer(config, drain_seconds=60)
    server.handle_exit(signal.SIGTERM, None)
    assert server.should_exit and app.draining and server._captured_signals == [signal.SIGTERM]
    server.handle_exit(signal.SIGTERM, None)  # repeated: no force_exit, the drain window unchanged
    assert not server.force_exit and server._captured_signals == [signal.SIGTERM]

    async def main() -> None:
        assert await server.on_tick(0) is False  # still draining
        server.drain_ends = 0.0
        assert await server.on_tick(1) is True
        shut: list[bool] = []

        class Connection:
            def shutdown(self) -> None:
                shut.append(True)
                server.server_state.connections.discard(self)

        server.servers = []
        server.lifespan = config.lifespan_class(config)
        server.server_state.connections.add(Connection())  # type: ignore[arg-type]
        await server.shutdown()
        assert shut == [True]

    asyncio.run(main())


@pytest.mark.parametrize("listener", ["ipv4", "ipv6", "unix", "socketpair"])
def test_connection_addresses_are_uvicorn_s(app: TangApplication, listener: str, tmp_path: Path) -> None:
    """`connection_made` reads the addresses from the transport rather than from a socket object built for them;
    they must be what uvicorn's own `get_local_addr` and `get_remote_addr` give, on real uvloop connections of
    every kind we serve: TCP over IPv4 and IPv6, a Unix socket (--uds), a socket pair (tangd's pipe mode)."""
    seen: dict[str, object] = {}

    class Recording(TangHttpProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            seen["ours"] = (self.server, self.client)
            seen["uvicorn"] = (get_local_addr(transport), get_remote_addr(transport))
            transport.close()

    async def main() -> None:
        config = uvicorn.Config(app, http=Recording, lifespan="off", log_config=None, proxy_headers=False)
        config.load()
        state = ServerState()
        loop = asyncio.get_running_loop()

        def factory() -> Recording:
            return Recording(config=config, server_state=state, app_state={})

        server: asyncio.AbstractServer | None = None
        if listener == "socketpair":
            ours, theirs = socket.socketpair()
            await loop.connect_accepted_socket(factory, ours)
            reader, writer = await asyncio.open_connection(sock=theirs)
        elif listener == "unix":
            path = str(tmp_path / "tang.sock")
            server = await loop.create_unix_server(factory, path)
            reader, writer = await asyncio.open_unix_connection(path)
        else:
            host = "127.0.0.1" if listener == "ipv4" else "::1"
            server = await loop.create_server(factory, host, 0)
            reader, writer = await asyncio.open_connection(host, server.sockets[0].getsockname()[1])
        async with asyncio.timeout(10):  # bounds a hang
            assert await reader.read() == b""  # closed by the protocol once it has recorded
        writer.close()
        if server is not None:
            server.close()

    uvloop.run(main())
    assert seen["ours"] == seen["uvicorn"]
    assert seen["ours"] is not None


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error"])
def test_no_trace_line_is_formatted_per_connection(keys: Path, level: str) -> None:
    """uvicorn's protocol formats and logs a TRACE line per connection when its logger's own `level` is at or below
    TRACE, which an unset level (0) is, whatever the effective level: our logging configuration sets it."""
    loggers = [logging.getLogger(name) for name in ("tang_server", "uvicorn", "uvicorn.error")]
    saved = [(logger.level, logger.handlers[:], logger.propagate) for logger in loggers]
    logging.config.dictConfig(log_config(Settings(keys_dir=keys, log_level=level)))
    try:
        assert logging.getLogger("uvicorn.error").level > TRACE_LOG_LEVEL
        assert logging.getLogger("uvicorn.error").getEffectiveLevel() == getattr(logging, level.upper())
    finally:  # the rest of the test session logs as before
        for logger, (saved_level, handlers, propagate) in zip(loggers, saved, strict=True):
            logger.setLevel(saved_level)
            logger.handlers[:] = handlers
            logger.propagate = propagate


class BufferingTransport(MockTransport):
    """A transport holding `buffered` bytes the client has not taken, which an abort resets."""

    def __init__(self) -> None:
        super().__init__()
        self.buffered = 0
        self.aborted = False

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def abort(self) -> None:
        self.aborted = self.closed = True


@pytest.mark.parametrize("closed", [False, True])
def test_answers_the_client_stops_taking_reset_the_connection(app: TangApplication, closed: bool) -> None:
    """`_check_stalled`, by the sweep's clock: a connection whose answers wait (writing paused, or closed with
    answers buffered) is reset once the client has taken nothing for the limit (the request deadline; after a
    close, LINGER_SECONDS), and not while it takes some, however slowly, nor on an earlier wait's account."""
    limit = LINGER_SECONDS if closed else TangHttpProtocol.request_timeout

    async def test(protocol: TangHttpProtocol, transport: MockTransport) -> None:
        assert isinstance(transport, BufferingTransport)
        # No request deadline: the chosen clock is not the loop's, and only the stall is under test here.
        protocol._deadline = None
        transport.buffered = 200_000
        protocol.pause_writing()
        transport.closed = closed
        now = 1000.0
        protocol._check_deadlines(now)
        protocol._check_deadlines(now + limit - 0.25)
        for _ in range(20):  # a slow reader: a little taken at every sweep, for many times the limit
            now += limit / 2
            transport.buffered -= 1000
            protocol._check_deadlines(now)
            assert not transport.aborted
        if not closed:
            protocol.resume_writing()  # the client caught up; later it stops reading again
            protocol._check_deadlines(now + limit * 3)
            protocol.pause_writing()
            now += limit * 4
            protocol._check_deadlines(now)  # the new wait starts here, not at the first one
            assert not transport.aborted
        protocol._check_deadlines(now + limit - 0.25)
        assert not transport.aborted
        protocol._check_deadlines(now + limit)
        assert transport.aborted

    run(test, app, transport_class=BufferingTransport)
