"""The server's side of the hand-over (`handoff.py`): the control socket, and connections adopted from `tangd`.

The control socket is bound once per server (by the only process, or by the supervisor before it starts the
workers, which all accept on it like on the HTTP listener). Each serving process runs a `HandoffListener` on its
event loop: it accepts control connections, takes the descriptor, answers b"+" and only then lets uvicorn's
protocol read the connection, so that a connection is never read by both `tangd` and the server. Once the process
closes (`stop`, at the start of uvicorn's shutdown), requests still arriving are refused or reset, and `tangd`
serves them itself; the ones taken before are already uvicorn connections, which the shutdown answers and closes
like any other.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

from tang_server.serving import handoff

logger = logging.getLogger(__name__)

#: A hand-over request is a few hundred bytes; this bounds what a confused client can make us read.
_MESSAGE_BYTES = 8192
_FD_BYTES = array.array("i").itemsize


def bind(path: str) -> tuple[socket.socket, int]:
    """Listen on the control socket at `path` (mode 0600; its directory made 0700 if missing), replacing a stale
    file or another server's socket; returns the socket and the file's inode, to remove only our own file."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # a killed server's file, or a previous server's: the newest server takes over
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    previous = os.umask(0o177)  # 0600 from the first moment, not after a chmod
    try:
        sock.bind(path)
    finally:
        os.umask(previous)
    sock.listen(64)
    sock.setblocking(False)
    return sock, os.stat(path).st_ino


def unlink(path: str, inode: int) -> None:
    """Remove the control socket file if it is still ours (a newer server may have replaced it)."""
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == inode:
            os.unlink(path)


class HandoffListener:
    """Accepts hand-overs on one event loop and gives each connection to `adopt` (uvicorn's accepted path)."""

    def __init__(
        self,
        sock: socket.socket,
        keys_dir: Path,
        prefix: str,
        adopt: Callable[[socket.socket], Awaitable[None]],
    ) -> None:
        self.sock = sock
        self.real_path = os.fsencode(os.path.realpath(keys_dir))
        self.prefix = prefix.strip("/")
        self.adopt = adopt
        self.loop = asyncio.get_running_loop()
        self.waiting: set[socket.socket] = set()  # control connections whose request has not arrived
        self.adopting: set[asyncio.Task[None]] = set()
        self.closed = False
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            control, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return  # another worker took it
        except OSError as exc:
            logger.warning("hand-over socket: %s", exc)
            return
        control.setblocking(False)
        self.waiting.add(control)
        self.loop.add_reader(control.fileno(), self._receive, control)

    def _receive(self, control: socket.socket) -> None:
        self.loop.remove_reader(control.fileno())
        self.waiting.discard(control)
        with control:
            try:
                message, ancillary, flags, _ = control.recvmsg(_MESSAGE_BYTES, socket.CMSG_SPACE(4 * _FD_BYTES))
            except OSError:
                return
            descriptors = _descriptors(ancillary)
            if not descriptors:
                return
            for extra in descriptors[1:]:
                os.close(extra)
            connection = _Adopted(fileno=descriptors[0])
            if not self._acceptable(message, flags, connection):
                connection.close()
                with contextlib.suppress(OSError):
                    control.send(handoff.REFUSED)
                return
            try:
                control.send(handoff.ACCEPTED)
            except OSError:  # tangd gave up (or died) first: it serves the connection, or nobody may
                connection.close()
                return
            connection.control = control.dup()  # closed with the connection: a waiting tangd then exits
        task = self.loop.create_task(self._adopt(connection))
        self.adopting.add(task)
        task.add_done_callback(self.adopting.discard)

    def _acceptable(self, message: bytes, flags: int, connection: socket.socket) -> bool:
        request = handoff.parse_request(message)
        if self.closed or request is None or flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            return False
        path, prefix = request
        if path != self.real_path or prefix != self.prefix:
            logger.info("hand-over refused: tangd serves another key directory or endpoint")
            return False
        return connection.type == socket.SOCK_STREAM

    async def _adopt(self, connection: socket.socket) -> None:
        try:
            await self.adopt(connection)
        except Exception:
            logger.exception("cannot serve a handed-over connection")
            connection.close()

    async def stop(self) -> None:
        """Take no more hand-overs; return once the ones taken are uvicorn connections."""
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()  # with every process's copy closed, connections not accepted yet are reset
        for control in self.waiting:
            self.loop.remove_reader(control.fileno())
            control.close()  # tangd reads the end of the connection: it serves the connection itself
        self.waiting.clear()
        if self.adopting:
            await asyncio.gather(*self.adopting, return_exceptions=True)


class _Adopted(socket.socket):
    """A handed-over connection, which closes its control connection when it is closed or detached (uvloop's
    transports detach the socket object and close the descriptor themselves)."""

    control: socket.socket | None = None

    def close(self) -> None:
        super().close()
        self._release()

    def detach(self) -> int:
        fd = super().detach()
        self._release()
        return fd

    def _release(self) -> None:
        control, self.control = self.control, None
        if control is not None:
            control.close()


def _descriptors(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    found: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[: len(data) - len(data) % _FD_BYTES])
            found.extend(fds)
    return found
