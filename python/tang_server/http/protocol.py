"""uvicorn's httptools protocol with what the Tang protocol and a hostile network need.

- The request target is kept exactly as the client sent it. uvicorn parses it into `raw_path` and
  `query_string`, which loses what the reference server's routing sees: an absolute-form target
  (`GET http://host/adv`, 404 for the reference) and an empty query (`/adv?`, also 404). The raw bytes go into
  the scope's extensions, where `app.request_target` looks first.
- A client that half-closes its connection after sending (shutdown(SHUT_WR), or the end of standard input for
  `tangd`) still gets every answer it asked for; uvicorn would drop the connection with answers pending.
- Slow or endless requests are cut off. uvicorn has no deadline for a request to arrive (a client sending one
  byte per second holds its connection forever) and httptools no bound on the size of a request line or
  headers: here a whole request must arrive within `request_timeout` seconds (else 408 and close; an idle
  kept-alive connection is closed silently), its target must stay under `max_target_bytes` (414, decided as
  the target arrives instead of after buffering it) and its headers under `max_header_bytes` (431). A client
  that half-closes in the middle of a request can never finish it: 400 at once rather than 408 at the deadline.
- A refused request (400, 408, 414, 431) ends in a lingering close, as in nginx and Apache: the refusal goes
  out with the end of our side of the connection, then what the client still sends is read and dropped until it
  finishes (or for `LINGER_SECONDS`, or `DISCARD_LIMIT` bytes). Closing at once with request bytes unread would
  make the kernel reset the connection, which can destroy the refusal before the client reads it. The exception:
  behind an earlier pipelined request still being answered on the general path (whose answer would have to come
  first, and cannot follow our end of the connection), the connection is closed at once, without an answer. A
  request answered before its body arrived (a 404 reads none) whose body then breaks the framing gets no second
  answer: only the lingering close. An answer that ends the connection (`Connection: close`) before its
  request's body has arrived ends it with a lingering close too (`_CycleTransport`).
- A connection whose answers the client does not take is reset: once closed, after `LINGER_SECONDS` without
  progress (uvloop would wait for ever to write them); open with writing paused, after `request_timeout` (the
  general path's cycle would wait for ever to write the next one).
- Deadlines are checked by one sweep per event loop (`_Sweep`), not a timer per connection.
- `/rec` and `/adv` requests are answered on the direct path (`direct.py`) when nothing needs the ASGI cycle.
- Stopping drops nothing received (`server.DrainingServer`). While the process drains, a direct answer that is the
  last thing its connection has received carries `Connection: close`, so kept-alive clients reconnect (through
  the load balancer, to another replica). Once the listener has closed (`shutdown`), each connection answers
  everything it has received, pipelined or not, then closes; an idle one closes at once. uvicorn's own
  `shutdown` closes every connection without a running ASGI cycle, dropping a direct request not yet answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import socket
import struct
import termios
import time
from collections import deque
from http import HTTPStatus
from typing import Any, ClassVar

import httptools
import uvicorn
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.utils import is_ssl
from uvicorn.server import ServerState

from tang_server.http.app import ARRIVAL_EXTENSION, DISCARD_LIMIT, RAW_TARGET_EXTENSION, Request
from tang_server.http.direct import DirectAnswers, DirectRequest, RememberedAnswerBytes, framed_by_length
from tang_server.http.responses import Answer
from tang_server.settings import Settings

logger = logging.getLogger(__name__)
_UVICORN_ERROR_LOGGER = logging.getLogger("uvicorn.error")
_UVICORN_ACCESS_LOGGER = logging.getLogger("uvicorn.access")

#: How long a refused connection is read and drained at most before it is closed (a client that neither stops
#: sending nor closes).
LINGER_SECONDS = 5.0
#: How often a worker checks its connections' deadlines (`_Sweep`): a deadline is acted on at most this late.
SWEEP_SECONDS = 0.25

_STATUS_LINES = {
    400: b"400 Bad Request",
    408: b"408 Request Timeout",
    414: b"414 URI Too Long",
    431: b"431 Request Header Fields Too Large",
}


class TangHttpProtocol(HttpToolsProtocol):
    # Set per process from the settings (`configure`); uvicorn instantiates the class itself.
    request_timeout = Settings.request_timeout
    max_target_bytes = Settings.max_target_bytes
    max_header_bytes = Settings.max_header_bytes

    client_done = False
    _headers_done = False
    _message_done = True
    _received = 0  # bytes of the request being received, until its headers are complete
    _header_bytes = 0
    _sweep: _Sweep | None = None  # checks `_deadline` and `_linger_until`
    _deadline: float | None = None  # loop time by which the request being received must be complete
    _answered_at: float | None = None  # idle since this answer: the next request's deadline counts from it
    _linger_until: float | None = None  # loop time at which a refused connection is closed, drained or not
    _stalled_since: float | None = None  # answers wait for the client, and none was taken since then
    _stalled_bytes = 0  # what was buffered at the last check
    _direct: DirectRequest | None = None  # a direct-path request whose body is arriving
    _pending: DirectRequest | None = None  # a complete direct-path request waiting for its answer
    _closing = False  # the listener has closed: close once everything received is answered
    _lingering = False  # refused: what arrives is dropped until the client finishes (`_refuse`)
    _drained = 0  # bytes dropped while lingering

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        # uvicorn's, without two `logging.getLogger` calls and a walk up the logging tree (does uvicorn's access
        # logger have handlers?) per connection: a fifth of a new connection's Python. Every configuration we
        # build turns uvicorn's access log off (ours is accesslog.py). test_protocol_contract compares the result
        # with uvicorn's own.
        if not config.loaded:
            config.load()
        self.config = config
        self.app = config.loaded_app
        self.loop = _loop or asyncio.get_event_loop()
        self.logger = _UVICORN_ERROR_LOGGER
        self.access_logger = _UVICORN_ACCESS_LOGGER
        self.access_log = False
        self.parser = httptools.HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.ws_protocol_class = config.ws_protocol_class
        self.root_path = config.root_path
        self.asgi_version = config.asgi_version
        self.limit_concurrency = config.limit_concurrency
        self.app_state = app_state
        self.timeout_keep_alive_task = None
        self.timeout_keep_alive = config.timeout_keep_alive
        self.server_state = server_state
        self.connections = server_state.connections
        self.tasks = server_state.tasks
        self.transport = None  # type: ignore[assignment]
        self.flow = None  # type: ignore[assignment]
        self.server = None
        self.client = None
        self.scheme = None
        self.pipeline = deque()
        self.scope = None  # type: ignore[assignment]
        self.headers = None  # type: ignore[assignment]
        self.expect_100_continue = False
        self.cycle = None  # type: ignore[assignment]

    @classmethod
    def configure(cls, request_timeout: float, max_target_bytes: int, max_header_bytes: int) -> None:
        cls.request_timeout = request_timeout
        cls.max_target_bytes = max_target_bytes
        cls.max_header_bytes = max_header_bytes

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # uvicorn's, with the addresses read from the transport: uvicorn's `get_local_addr` and `get_remote_addr`
        # ask for the transport's socket, which uvloop builds as a Python socket object per connection, for two
        # addresses the transport has already (a tenth of a new connection's CPU: 72 to 65 us per /adv here).
        self.connections.add(self)
        self.transport = transport
        self.flow = FlowControl(transport)
        self.server = _address(transport.get_extra_info("sockname"))
        peer = _address(transport.get_extra_info("peername"))
        self.client = (peer[0], peer[1]) if peer is not None and peer[1] is not None else None  # no Unix peer
        self.scheme = "https" if is_ssl(transport) else "http"
        self._sweep = _Sweep.of(self.loop)
        self._sweep.connections.add(self)
        self._start_deadline()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            self._drained += len(data)
            if self._drained > DISCARD_LIMIT:
                self.transport.close()
            return
        if not self._headers_done:
            self._received += len(data)
        super().data_received(data)
        incomplete = not self._headers_done and not self._finished()
        if incomplete and self._received > self.max_header_bytes + self.max_target_bytes:
            self._refuse(431)  # headers still not complete: do not buffer more

    def on_message_begin(self) -> None:
        if self._lingering:
            return  # the rest of a refused connection's last read: dropped like what follows
        # A next request has begun: answering the previous one below must not find the connection finished and
        # close it (the bytes of this request are already read from the socket, so the kernel shows none).
        self._message_done = False
        if self._pending is not None:
            self._answer_pending(blocking=True)  # a pipelined request: answers leave in request order
        super().on_message_begin()
        self._headers_done = False
        self._header_bytes = 0
        if self._answered_at is not None:  # no longer idle: the request has its whole deadline from the answer
            self._deadline = self._answered_at + self.request_timeout
            self._answered_at = None
        elif self._deadline is None:
            self._start_deadline()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) >= self.max_target_bytes and not self._finished():
            self._refuse(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self.max_header_bytes and not self._finished():
            self._refuse(431)

    def on_headers_complete(self) -> None:
        self._headers_done = True
        self._received = 0
        if self._finished():
            return  # refused while the headers arrived: no application call
        # time.monotonic, not loop.time: uvloop caches the loop's clock for a whole iteration, in which many
        # requests may be parsed and answered one after the other.
        arrival = time.monotonic()
        self._direct = self._direct_request(arrival)
        if self._direct is not None:
            return
        extensions: dict[str, object] = {RAW_TARGET_EXTENSION: self.url, ARRIVAL_EXTENSION: arrival}
        self.scope["extensions"] = extensions  # type: ignore[typeddict-item]
        super().on_headers_complete()
        self.cycle.transport = _CycleTransport(self)  # type: ignore[assignment]

    def on_body(self, body: bytes) -> None:
        if self._direct is not None:
            self._direct.body += body  # bounded: the declared length is under the limit
        elif not self._finished():  # a refused request has no cycle to feed
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._lingering:
            return  # a refused request's end, in the read that refused it: nothing to answer, no deadline
        self._message_done = True
        self._headers_done = False  # what follows is the next request's
        self._received = 0
        self._deadline = None
        if self._direct is not None:
            self._pending, self._direct = self._direct, None
            self.loop.call_soon(self._answer_pending)
        elif not self._finished():
            super().on_message_complete()
            if self.cycle is not None and self.cycle.response_complete:
                # Answered before its body had arrived (a 404 reads no body). That late body cancelled uvicorn's
                # keep-alive timer, and nothing else would ever close this idle connection: start the clock again.
                self._start_deadline()

    def eof_received(self) -> bool:  # type: ignore[override]  # asyncio allows True: keep our side open
        self.client_done = True
        if not self._lingering and not self._message_done:
            self._refuse(400)  # a request begun that can never be finished: say so now, not at its deadline
        return not self._lingering and not self._idle()

    def on_response_complete(self) -> None:
        if self._lingering:
            return  # the answer ended the connection: no pipelined request may start after our end of it
        # uvicorn's, except its keep-alive timer (armed and cancelled per request): the deadline closes an idle
        # connection after --keep-alive-seconds, as that timer did.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        if (self.client_done and self._idle()) or (self._closing and self._nothing_more()):
            self.transport.close()
        elif not self._finished():
            self._start_deadline(idle=self._message_done and self._idle())

    def answering(self) -> bool:
        """True while a request received on this connection has not been answered."""
        return not self._finished() and not self._nothing_more()

    def shutdown(self) -> None:
        """Called by uvicorn once the listener has closed: answer what was received, then close."""
        self._closing = True
        if self._finished():
            return
        if self._nothing_more():
            self.transport.close()  # idle: nothing to answer
            return
        answering_last = (
            self.cycle is not None
            and not self.cycle.response_complete
            and not self.pipeline
            and self._direct is None
            and self._pending is None
            and (self._message_done or self._headers_done)  # nothing of a next request parsed yet
            and _unread(self.transport) == 0
        )
        if answering_last:
            self.cycle.keep_alive = False  # its answer says `Connection: close`, then uvicorn closes

    def resume_writing(self) -> None:
        super().resume_writing()
        self._stalled_since = None  # the client caught up: a later wait is timed from its own start
        self.flow.resume_reading()  # paused by a direct answer that filled the write buffer

    def send_400_response(self, msg: str) -> None:
        self._refuse(400)  # uvicorn's closes at once; its warning has been logged

    def connection_lost(self, exc: Exception | None) -> None:
        self._direct = self._pending = None
        if self._sweep is not None:
            self._sweep.connections.discard(self)
        super().connection_lost(exc)

    def _finished(self) -> bool:
        """True once this connection answers nothing more: closed, or lingering after a refusal."""
        return self._lingering or self.transport.is_closing()

    def _nothing_more(self) -> bool:
        """True when every request this connection has received is answered: none being parsed, answered or
        queued, and no byte waiting in the socket (closing with unread bytes would also reset the connection,
        which can destroy answers the client has not read yet)."""
        return self._message_done and self._idle() and _unread(self.transport) == 0

    def _idle(self) -> bool:
        return (
            not self.pipeline
            and self._pending is None
            and self._direct is None
            and (self.cycle is None or self.cycle.response_complete)
        )

    def _direct_request(self, arrival: float) -> DirectRequest | None:
        """The request as a direct-path request, or None when it takes the general path."""
        app = _direct_answers(self.app)
        busy = self.pipeline or (self.cycle is not None and not self.cycle.response_complete)
        if app is None or busy or self.expect_100_continue or self.parser.should_upgrade():
            return None
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            return None  # uvicorn answers 503
        method = self.parser.get_method().decode("ascii")
        match = app.dispatch(method, self.url)
        if match.route is None or not match.route.tang or not framed_by_length(self.headers, app.max_body_bytes):
            return None
        http_version = self.parser.get_http_version()
        request = Request(
            method=method,
            target=self.url,
            http_version=http_version,
            client=app.client(self.client[0] if self.client else None, self.headers),
            arrival=arrival,
        )
        keep_alive = http_version != "1.0" and self.parser.should_keep_alive()
        return DirectRequest(match.route, match.thp, request, keep_alive, bytearray())

    def _answer_pending(self, blocking: bool = False) -> None:
        """Answers the pending direct-path request, with every key change completed before now."""
        direct = self._pending
        if direct is None or (direct.refresh is not None and not direct.refresh.done() and not blocking):
            return
        app = _direct_answers(self.app)
        assert app is not None
        if blocking and direct.refresh is not None and not direct.refresh.done():
            # The next request is arriving and this answer must leave first: wait for the rebuild this request
            # started (refresh() takes the lock the thread holds, then applies anything queued since).
            app.store.refresh()
        elif direct.refresh is None and not app.store.is_fresh():
            if blocking:
                app.store.refresh()
            else:  # apply the change off the loop, as the general path does, then answer
                direct.refresh = asyncio.ensure_future(asyncio.to_thread(app.store.refresh))
                direct.refresh.add_done_callback(lambda _: self._answer_pending())
                return
        self._pending = None
        if self._finished():
            return  # the client is gone: spare the multiplication
        began = time.perf_counter()
        request = direct.request
        request.body = bytes(direct.body)
        try:
            answer = app.answer(direct.route, direct.thp, request, app.store.keyset)
        except Exception:
            logger.exception("error answering %s", request.method)  # as on the general path: no details out
            answer = Answer(HTTPStatus.INTERNAL_SERVER_ERROR)
        keep_alive = direct.keep_alive
        if (app.draining or self._closing) and keep_alive and not blocking and self._nothing_more():
            keep_alive = False  # stopping, and nothing else received: the client must reconnect (elsewhere)
        self.transport.write(_answer_bytes(answer, self.server_state.default_headers, keep_alive))
        app.record(direct.route.name, request, answer.status, time.perf_counter() - began)
        if not keep_alive:
            self.transport.close()
        self.on_response_complete()
        if self.flow.write_paused:
            self.flow.pause_reading()  # a client that does not read its answers gets no more until it does

    def _start_deadline(self, *, idle: bool = False) -> None:
        """The request being received (or the next one) must be complete within request_timeout; an idle
        connection (`idle`: everything received is answered) is closed after the keep-alive time if shorter."""
        now = self.loop.time()
        self._answered_at = now if idle else None
        self._deadline = now + (min(self.timeout_keep_alive, self.request_timeout) if idle else self.request_timeout)

    def _check_deadlines(self, now: float) -> None:
        """Acts on a deadline that has passed (called by `_Sweep`)."""
        if self.transport.is_closing():
            self._check_stalled(now, LINGER_SECONDS)
            return
        if self.flow.write_paused:
            self._check_stalled(now, self.request_timeout)  # after a reset, the checks below find nothing to do
        if self._linger_until is not None and now >= self._linger_until:
            self.transport.close()
        elif self._deadline is not None and now >= self._deadline:
            self._deadline = self._answered_at = None
            self._request_overdue()

    def _check_stalled(self, now: float, limit: float) -> None:
        """Answers wait for a client that does not read them: a closed connection's last ones (uvloop would wait
        for ever to write them: pipelined requests never read, say), or enough of them that writing has paused. The
        connection is reset once the client has taken nothing for `limit` seconds. Nothing is added to the buffer
        meanwhile (closed; or paused: the general path waits to write, the direct path stops reading after the
        answer it was writing), so a buffer smaller than at the last check means the client took some: a slow
        reader that reads keeps its answers."""
        buffered = self.transport.get_write_buffer_size()
        if self._stalled_since is None or buffered < self._stalled_bytes:
            self._stalled_since = now
        elif now - self._stalled_since >= limit:
            # A reset (linger 0): a plain close would leave the kernel sending its own buffer to that client.
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()
        self._stalled_bytes = buffered

    def _request_overdue(self) -> None:
        if self._finished():
            return
        answering = self._pending is not None or (self.cycle is not None and not self.cycle.response_complete)
        answered = (
            self._direct is None and self._pending is None and self.cycle is not None and self.cycle.response_complete
        )
        if self._message_done and answering:
            self._start_deadline()  # still answering the last request: the clock starts after it
        elif (self._message_done and self._received == 0) or (self._headers_done and answered):
            # Idle between requests, or still sending the body of a request already answered: close quietly.
            self.transport.close()
        else:
            self._refuse(408)

    def _refuse(self, status: int) -> None:
        """Answers `status` and ends the connection with a lingering close (see the module's docstring)."""
        if self._pending is not None:
            self._answer_pending(blocking=True)  # answers leave in request order
        if self._finished():
            return  # that answer closed the connection
        cycle = self.cycle
        answered = False
        if self._headers_done and self._direct is None and cycle is not None and not self.pipeline:
            # The refused request's own cycle, its body still arriving.
            if cycle.response_started and not cycle.response_complete:
                self.transport.close()  # its answer is on its way: a refusal cannot go in the middle of it
                return
            answered = cycle.response_started  # answered before its body arrived: no second answer
            cycle.disconnected = True  # it writes nothing more (not even 100 Continue)
            cycle.waiting_for_100_continue = False
            cycle.message_event.set()
        elif self.pipeline or (cycle is not None and not cycle.response_complete):
            # An earlier pipelined request is still being answered on the general path: its answer would have to
            # come first, and nothing can follow our end of the connection. Close without an answer; the client
            # sends again.
            self.transport.close()
            return
        if not answered:
            self.transport.write(
                b"HTTP/1.1 " + _STATUS_LINES[status] + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
        self._linger()

    def _close_answered(self) -> None:
        """Closes the connection after a general-path answer that ends it (`Connection: close`, an error): at once
        when its request was read to its end and nothing more waits in the socket, else with a lingering close (a
        404 or 405 is answered before its body arrives)."""
        if self._finished():
            return
        if self._message_done and _unread(self.transport) == 0:
            self.transport.close()
        else:
            self._linger()

    def _linger(self) -> None:
        """Ends our side of the connection and drops what the client still sends (see the module's docstring)."""
        self._lingering = True
        self._direct = None
        self._deadline = self._answered_at = None
        self.transport.write_eof()
        if self.client_done:
            self.transport.close()  # the client has finished already: nothing left to drain
            return
        self.flow.resume_reading()
        self._linger_until = self.loop.time() + LINGER_SECONDS


class _CycleTransport:
    """The transport as uvicorn's response cycle sees it. The cycle closes the connection itself after an answer
    that ends it, even when the request's body has not arrived (a 404 reads none), and a close with request bytes
    unread is a reset that can destroy the answer: closing goes through the protocol, which lingers then."""

    __slots__ = ("_protocol",)

    def __init__(self, protocol: TangHttpProtocol) -> None:
        self._protocol = protocol

    def write(self, data: bytes) -> None:
        transport = self._protocol.transport
        # Once closed, what the cycle writes cannot go out; uvloop raises rather than drop it. It happens when a
        # reset (`_check_stalled`) wakes a cycle waiting for room before connection_lost tells it the client is gone.
        if not transport.is_closing():
            transport.write(data)

    def is_closing(self) -> bool:
        return self._protocol._finished()

    def close(self) -> None:
        self._protocol._close_answered()


class _Sweep:
    """The deadlines of one event loop's connections, checked by one timer every `SWEEP_SECONDS` while any is
    open. A timer armed and cancelled per connection, and per request, cost more than parsing an /adv request."""

    _of_loop: ClassVar[dict[asyncio.AbstractEventLoop, _Sweep]] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.connections: set[TangHttpProtocol] = set()
        loop.call_later(SWEEP_SECONDS, self._run)

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _Sweep:
        sweep = cls._of_loop.get(loop)
        if sweep is None:
            sweep = cls._of_loop[loop] = cls(loop)
        return sweep

    def _run(self) -> None:
        if not self.connections:
            del self._of_loop[self.loop]  # the next connection starts another
            return
        self.loop.call_later(SWEEP_SECONDS, self._run)
        now = self.loop.time()
        for protocol in list(self.connections):  # a check can close a connection, which leaves the set
            try:
                protocol._check_deadlines(now)
            except Exception:  # a defect in one connection must not stop every other connection's deadlines
                logger.exception("checking a connection's deadlines")


#: The direct path's answers as bytes (one per process: every connection of a worker sends the same /adv).
_answer_bytes = RememberedAnswerBytes()


@functools.cache
def _direct_answers(app: object) -> DirectAnswers | None:
    """The application as the direct path's interface, when it offers it and can answer on the loop (checked
    once per application, not per request)."""
    return app if isinstance(app, DirectAnswers) and app.answers_directly else None


def _address(info: object) -> tuple[str, int | None] | None:
    """An address as uvicorn's scope has it: (host, port) for a network socket, (path, None) for a Unix one."""
    if isinstance(info, (list, tuple)) and len(info) >= 2:
        return (str(info[0]), int(info[1]))
    return (info, None) if isinstance(info, str) else None


def _unread(transport: asyncio.BaseTransport) -> int:
    """Bytes received by the kernel on the connection that the protocol has not read yet."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0])
    except (OSError, ValueError):  # closed meanwhile
        return 0
