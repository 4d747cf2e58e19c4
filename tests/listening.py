"""Starting servers on ports chosen here, retried on collision, and asking the kernel what a process listens on."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .support import Server, free_port, stop_process_group, wait_for_workers

#: What a server says when another process took its port between our choice and its bind.
_COLLISION = ("address already in use", "[errno 98]")


class PortTaken(RuntimeError):
    """The port given to `launched` was taken by another process."""


def connectable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0


@contextlib.contextmanager
def launched(
    command: Callable[[int], Sequence[str]],
    log: Path,
    *,
    host: str = "127.0.0.1",
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    port: int | None = None,
) -> Iterator[Server]:
    """Run `command(port)` on a free port until it listens on `host`; on a port collision, again on another.
    With `port` given, only on that one (PortTaken on a collision)."""
    for _ in range(5):
        port_now = free_port() if port is None else port
        argv = command(port_now)
        with log.open("wb") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + timeout
        while process.poll() is None and not connectable(host, port_now):
            if time.monotonic() > deadline:
                stop_process_group(process, timeout=20)
                raise TimeoutError(f"nothing listening on {host}:{port_now}: {log.read_text(errors='replace')}")
            time.sleep(0.05)
        if process.poll() is not None:
            text = log.read_text(errors="replace")
            if any(marker in text.lower() for marker in _COLLISION):
                if port is not None:
                    raise PortTaken(text)
                continue  # somebody else's port by now: choose again
            raise RuntimeError(f"server exited with {process.returncode}: {text}")
        wait_for_workers(argv, process, log, deadline)
        try:
            yield Server(f"http://{host}:{port_now}", port_now, process, log)
        finally:
            stop_process_group(process, timeout=20)
        return
    raise RuntimeError("five port collisions in a row")


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def _address(hex_address: str) -> str:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        text = socket.inet_ntop(socket.AF_INET, raw[::-1])
    else:  # four little-endian 32-bit words
        text = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
    return f"{text}:{int(port, 16)}"


def kernel_listeners(pid: int) -> set[str]:
    """What the kernel says process `pid` listens on: `tcp ADDRESS:PORT` and `unix PATH` entries."""
    inodes = _socket_inodes(pid)
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[3] == "0A" and int(fields[9]) in inodes:  # 0A: LISTEN
                    found.add(f"tcp {_address(fields[1])}")
    with open("/proc/net/unix") as lines:
        next(lines)
        for line in lines:
            fields = line.split()
            if len(fields) >= 8 and fields[3] == "00010000" and int(fields[6]) in inodes:  # __SO_ACCEPTCON
                found.add(f"unix {fields[7]}")
    return found


def worker_pids(parent: int) -> set[int]:
    """The live worker processes of a server: its children, without zombies and multiprocessing's resource
    tracker (a worker killed and not yet reaped is a zombie, with no memory to report)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
            command = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        alive = not fields.get("State", "").strip().startswith(("Z", "X"))
        if int(fields["PPid"]) == parent and alive and b"resource_tracker" not in command:
            found.add(int(entry))
    return found
