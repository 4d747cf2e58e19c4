"""The two systemd protocols a service needs, in the few lines they take: socket activation and readiness.

- Socket activation (sd_listen_fds(3)): systemd, or `systemd-socket-activate`, opens the listening sockets and
  passes them as descriptors 3, 4, ... with LISTEN_FDS (how many) and LISTEN_PID (for whom: a variable inherited
  by a child is not meant for it).
- Readiness (sd_notify(3)): one datagram per state change to the AF_UNIX socket named by NOTIFY_SOCKET
  (a leading '@' names the abstract namespace): READY=1 once serving, STOPPING=1 when stopping, STATUS=... .

Both sets of variables are removed from the environment once read, so that worker processes, which inherit it,
neither adopt the descriptors nor report for the service (systemd's NotifyAccess=main accepts the main process).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket

logger = logging.getLogger(__name__)

#: The first descriptor systemd passes (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3


def listen_sockets() -> list[socket.socket]:
    """The listening sockets systemd passed to this process, in order; [] when none were passed to it."""
    pid, count = os.environ.pop("LISTEN_PID", None), os.environ.pop("LISTEN_FDS", None)
    os.environ.pop("LISTEN_FDNAMES", None)
    if pid != str(os.getpid()) or not count:
        return []
    sockets = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)  # ours now; workers receive them explicitly
        sockets.append(socket.socket(fileno=fd))  # family and type are read from the descriptor
    for sock in sockets:
        if sock.type != socket.SOCK_STREAM:
            raise ValueError(f"systemd passed a socket that is not a stream socket: {sock}")
    return sockets


class Notifier:
    """Sends sd_notify messages to the service manager, or does nothing when none listens."""

    def __init__(self, address: str | None) -> None:
        self.address = "\0" + address[1:] if address and address.startswith("@") else address

    @classmethod
    def from_environment(cls) -> Notifier:
        return cls(os.environ.pop("NOTIFY_SOCKET", None))

    def send(self, *assignments: str) -> None:
        if not self.address:
            return
        message = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self.address)
        except OSError as exc:  # the service manager going away must not stop the server
            with contextlib.suppress(Exception):
                logger.warning("cannot notify the service manager: %s", exc)

    def ready(self, digest: str) -> None:
        self.send("READY=1", f"STATUS=serving key set {digest}", f"MAINPID={os.getpid()}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=draining")
