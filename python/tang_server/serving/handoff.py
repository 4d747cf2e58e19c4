"""Handing an inetd-mode connection to a running `tang-server serve` for the same key directory.

`tangd DIR` without `-l` is started once per connection (systemd `Accept=yes`, xinetd, `socat ... EXEC:`). When a
server for DIR runs, starting a whole server per connection is waste: `tangd` passes its connection's descriptor
to that server over a Unix control socket (SCM_RIGHTS) and exits, and the server serves the connection exactly
as one it accepted itself (same protocol, application, metrics, access log and drain). This module is what
`tangd` needs for that, so it imports nothing but built-in modules: it runs before `tangd` knows whether it
must start a server of its own.

Discovery, without configuration: the control socket of the server for DIR is

    RUNDIR/handoff-H.sock    H: the first 32 hex digits of SHA-256 over DIR's real path (symlinks resolved)

where RUNDIR is, for the server, `$RUNTIME_DIRECTORY` (systemd's `RuntimeDirectory=tang-server`), else
`/run/tang-server` when running as root, else `$XDG_RUNTIME_DIR/tang-server`, else `/tmp/tang-server-UID`
(`serve --handoff-socket PATH` overrides it, `--handoff-socket none` turns handing over off). `tangd` tries
`$TANG_HANDOFF_SOCKET` when set, else `/run/tang-server`, `$XDG_RUNTIME_DIR/tang-server` and
`/tmp/tang-server-UID` in turn. The socket is mode 0600, so `tangd` must run as root or as the server's user.

The exchange, on a SOCK_SEQPACKET connection (each message arrives whole, with its descriptor):

    tangd -> server:  b"TANG-HANDOFF 1\\0" + DIR's real path + b"\\0" + the -e endpoint, with the descriptor
    server -> tangd:  b"+" (the server owns the connection now) or b"-" (refused: tangd serves it itself)
    server:           closes the control connection when it closes the connection (only a `tangd` whose parent
                      relays the connection waits for that: socat stops relaying once its EXEC child exits)

A connection is never lost or served twice: the server only reads from the connection after its b"+" was queued
to `tangd`, and drops its copy unread when that send fails. `tangd` serves the connection itself when there is no
socket, nobody listens (a stale file left by a killed server), the server refuses (another directory or
endpoint, or it has begun to close), or the control connection ends without an answer (a server that stops
resets the connections it had not accepted yet). If no answer comes within `REPLY_SECONDS` (a hung server),
`tangd` shuts the control connection down and reads once more: a b"+" queued before the shutdown is honoured,
and a later send fails in the server (the kernel decides under one lock), which then drops its copy.

`tangd` hands over only to a server it trusts: the peer's user (SO_PEERCRED) must be root, its own user or the
owner of the key directory, who could serve any answer from these keys anyway.
"""

from __future__ import annotations

import _socket
import os
import sys

MAGIC = b"TANG-HANDOFF 1\0"
ACCEPTED = b"+"
REFUSED = b"-"
#: How long `tangd` waits for the server's answer before serving the connection itself (a hung server).
REPLY_SECONDS = 2.0
#: Overrides where `tangd` looks for the control socket.
SOCKET_ENVIRONMENT = "TANG_HANDOFF_SOCKET"
#: The directory name under /run and $XDG_RUNTIME_DIR (systemd: RuntimeDirectory=tang-server).
RUNTIME_NAME = "tang-server"
_S_IFMT, _S_IFSOCK = 0o170000, 0o140000


def _sha256_hex(data: bytes) -> str:
    # hashlib loads OpenSSL, which costs more than tangd's whole hand-over: the built-in module when there is one
    # (_sha2 from Python 3.12, _sha256 before).
    for name in ("_sha2" if sys.version_info >= (3, 12) else "_sha256", "hashlib"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        return str(module.sha256(data).hexdigest())
    raise ImportError("no SHA-256 implementation")


def socket_name(directory: str) -> str:
    """The control socket's file name for a key directory (any path to it: the real path is hashed)."""
    real = os.path.realpath(directory)
    return f"handoff-{_sha256_hex(os.fsencode(real))[:32]}.sock"


def server_runtime_directory() -> str:
    """Where a server keeps its control socket (module docstring)."""
    systemd = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if systemd:
        return systemd
    candidates = _runtime_directories()  # /run's, then $XDG_RUNTIME_DIR's or /tmp's
    return candidates[0] if os.geteuid() == 0 else candidates[1]


def _runtime_directories() -> list[str]:
    found = [f"/run/{RUNTIME_NAME}"]
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        found.append(f"{xdg}/{RUNTIME_NAME}")
    found.append(f"/tmp/{RUNTIME_NAME}-{os.geteuid()}")  # noqa: S108 - created 0700, the peer's user is checked
    return found


def default_socket_path(directory: str) -> str:
    """The control socket a server for `directory` listens on unless told otherwise."""
    return f"{server_runtime_directory()}/{socket_name(directory)}"


def candidate_paths(directory: str) -> list[str]:
    """Where `tangd` looks for the control socket of a server for `directory`, in order."""
    explicit = os.environ.get(SOCKET_ENVIRONMENT)
    if explicit:
        return [explicit]
    name = socket_name(directory)
    return [f"{base}/{name}" for base in _runtime_directories()]


def request_message(directory: str, prefix: str) -> bytes:
    return MAGIC + os.fsencode(os.path.realpath(directory)) + b"\0" + prefix.strip("/").encode()


def parse_request(message: bytes) -> tuple[bytes, str] | None:
    """(real path, endpoint) from a hand-over request, or None when it is not one."""
    if not message.startswith(MAGIC):
        return None
    path, separator, prefix = message[len(MAGIC) :].partition(b"\0")
    if not separator:
        return None
    try:
        return path, prefix.decode()
    except UnicodeDecodeError:
        return None


def stdin_is_socket() -> bool:
    try:
        return os.fstat(0).st_mode & _S_IFMT == _S_IFSOCK
    except OSError:
        return False


def hand_over(directory: str, prefix: str, fd: int = 0) -> bool:
    """Pass the connection on `fd` to a running server for `directory`; True when the server took it (then this
    process must neither read nor write it again), False when the caller must serve it.

    When the connection is one end of an unnamed socket pair, a parent relays it (`socat ... EXEC:`), and may stop
    relaying once this process exits (socat does): then this closes its copies of the connection and returns
    only once the server is done with it (it closes the control connection when it closes the connection)."""
    message = request_message(directory, prefix)
    trusted = _trusted_users(directory)
    for path in candidate_paths(directory):
        answer = _try(path, message, fd, trusted)
        if answer is not None:
            return answer
    return False


def _relayed(fd: int) -> bool:
    """Whether the connection on `fd` is a socket pair's end (a relaying parent), not an accepted connection."""
    try:
        sock = _socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    try:
        return sock.family == _socket.AF_UNIX and not sock.getsockname()
    except OSError:
        return False
    finally:
        sock.close()


def _wait_until_served(control: _socket.socket, fd: int) -> None:
    """Close this process's copies of the connection on `fd` (standard output too when it is the same one), so
    that its end follows the server's, and wait until the server closes the control connection."""
    connection = os.fstat(fd)
    for copy in {fd, 1}:
        try:
            status = os.fstat(copy)
            if (status.st_dev, status.st_ino) == (connection.st_dev, connection.st_ino):
                os.close(copy)
        except OSError:
            pass
    control.settimeout(None)
    try:
        while control.recv(16):
            pass
    except OSError:
        pass


def _trusted_users(directory: str) -> set[int]:
    try:
        owner = os.stat(directory).st_uid
    except OSError:
        owner = 0
    return {0, os.geteuid(), owner}


def _try(path: str, message: bytes, fd: int, trusted: set[int]) -> bool | None:
    """True: handed over. False: refused or lost, serve it here. None: nobody there, try the next place."""
    control = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    control.settimeout(REPLY_SECONDS)  # also bounds a connect to a server whose backlog is full
    try:
        try:
            control.connect(path)
        except OSError:  # no such file, a stale file (refused), not a socket, no permission
            return None
        credentials = control.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
        if int.from_bytes(credentials[4:8], sys.byteorder) not in trusted:
            return None
        try:
            control.sendmsg([message], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fd.to_bytes(4, sys.byteorder))])
            accepted = control.recv(16) == ACCEPTED
        except TimeoutError:
            control.shutdown(_socket.SHUT_RDWR)
            return _last_answer(control) == ACCEPTED
        except OSError:  # reset: the server stopped before taking it
            return False
        if accepted and _relayed(fd):
            _wait_until_served(control, fd)
        return accepted
    finally:
        control.close()


def _last_answer(control: _socket.socket) -> bytes:
    control.setblocking(False)
    try:
        return bytes(control.recv(16))
    except OSError:
        return b""
