"""Per-connection cost of `tangd` in inetd mode: the reference, ours alone, ours handing over to a running server.

    python bench/inetd.py [--runs 30] [--output bench/results/inetd.json] [--tangd PATH]

Everything runs in one run, on one key directory made by the reference's tangd-keygen, on loopback only. Each
figure is the wall time of N connections served one after the other, divided by N, for `GET /adv` with
`Connection: close`:

- pipe: `printf '...' | tangd DIR` in a shell loop (the issue's measurement). Standard input is a pipe, so there
  is nothing to hand over: ours serves it itself even with a server running.
- socketpair: standard input and output are one end of a socket pair, as `socat ... EXEC:` gives them; the
  bench writes the request on the other end and reads the answer to its end.
- tcp: `systemd-socket-activate -a --inetd -l 127.0.0.1:PORT tangd DIR` (what a systemd `Accept=yes` unit
  does: one process per connection, the TCP connection as standard input and output), with a TCP client that
  half-closes after its request, as above.

`--tangd` measures another launcher of ours than the installed console script (for example one that does not
import `re` first, as pip's does). Our processes run without PYTHONDONTWRITEBYTECODE, as installed (compiled
modules cached); a few warm-up connections come first. Ratios are to the reference in the same mode of the same
run. Besides wall time, the CPU time of every process of a figure (launcher and shell included, a running
server's share not) is reported per connection: on a shared, loaded machine it varies much less than wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

BIN = Path(sys.executable).parent
REFERENCE_TANGD = "/usr/libexec/tangd"
REFERENCE_KEYGEN = "/usr/libexec/tangd-keygen"
REQUEST = b"GET /adv HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
WARMUP = 3
DEADLINE = 60.0  # bounds a hang


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def per_connection(run: Callable[[], None], runs: int) -> float:
    """Seconds per connection over `runs` sequential connections, after warming up."""
    for _ in range(WARMUP):
        run()
    began = time.perf_counter()
    for _ in range(runs):
        run()
    return (time.perf_counter() - began) / runs


def pipe_mode(command: list[str], runs: int) -> float:
    """The shell loop: the whole loop is timed, as `time (for ...; do printf | tangd; done)` would."""
    quoted = " ".join(f"'{part}'" for part in command)
    request = REQUEST.decode().replace("\r", "\\r").replace("\n", "\\n")

    def loop(count: int) -> list[str]:
        return ["bash", "-c", f"for i in $(seq {count}); do printf '{request}' | {quoted} >/dev/null 2>&1; done"]

    subprocess.run(loop(WARMUP), env=environment(), check=True, timeout=DEADLINE * WARMUP)
    began = time.perf_counter()
    subprocess.run(loop(runs), env=environment(), check=True, timeout=DEADLINE * runs)
    return (time.perf_counter() - began) / runs


def socketpair_once(command: list[str]) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        process = subprocess.Popen(
            command, stdin=theirs.fileno(), stdout=theirs.fileno(), stderr=subprocess.DEVNULL, env=environment()
        )
        theirs.close()
        ours.sendall(REQUEST)
        ours.shutdown(socket.SHUT_WR)  # the reference reads to the end of its input before it exits
        answer = _read_all(ours)
        process.wait(DEADLINE)
    _check(answer)


def tcp_once(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as conn:
        conn.sendall(REQUEST)
        conn.shutdown(socket.SHUT_WR)
        _check(_read_all(conn))


def _read_all(conn: socket.socket) -> bytes:
    conn.settimeout(DEADLINE)
    chunks = []
    while chunk := conn.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _check(answer: bytes) -> None:
    if not answer.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"not a 200 answer: {answer[:80]!r}")


@contextlib.contextmanager
def activated(command: list[str]) -> Iterator[int]:
    """`systemd-socket-activate -a --inetd` on a free port, running `command` per connection."""
    for _ in range(20):  # the port may be taken between choosing and binding it: choose again
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        process = subprocess.Popen(
            ["systemd-socket-activate", "-a", "--inetd", "-l", f"127.0.0.1:{port}", *command],
            stderr=subprocess.DEVNULL,
            env=environment(),
        )
        deadline = time.monotonic() + DEADLINE
        while process.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                conn.sendall(REQUEST)
                conn.shutdown(socket.SHUT_WR)
                _read_all(conn)
                break
            time.sleep(0.05)
        if process.poll() is None:
            break
    else:
        raise RuntimeError("systemd-socket-activate never listened")
    try:
        yield port
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(DEADLINE)


@contextlib.contextmanager
def our_server(keys: Path, log: Path) -> Iterator[None]:
    """`tang-server serve` on the key directory (its control socket is what our tangd hands over to)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    command = [str(BIN / "tang-server"), "serve", "--keys-dir", str(keys), "--port", str(port), "--no-access-log"]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=out, env=environment())
    try:
        deadline = time.monotonic() + DEADLINE
        while "taking connections from tangd" not in log.read_text() or not _answers(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {log.read_text()}")
            time.sleep(0.05)
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(DEADLINE)


def _answers(port: int) -> bool:
    try:
        tcp_once(port)
    except OSError:
        return False
    return True


def measure(keys: Path, work: Path, runs: int, tangd: Path = BIN / "tangd") -> list[dict[str, object]]:
    reference = [REFERENCE_TANGD, str(keys)]
    ours = [str(tangd), str(keys)]
    rows: list[dict[str, object]] = []

    def row(mode: str, variant: str, run: Callable[[list[str]], float], command: list[str]) -> None:
        before = _children_cpu()
        seconds = run(command)
        # Every process of the figure (warm-up and launcher included) has been waited for; a running server's
        # own share is not in it (about what one request costs it in `serve`).
        connections = runs + WARMUP + (1 if mode == "tcp" else 0)
        cpu = (_children_cpu() - before) / connections
        rows.append({"mode": mode, "tangd": variant, "ms_per_connection": round(seconds * 1000, 2),
                     "cpu_ms_per_connection": round(cpu * 1000, 2)})  # fmt: skip
        print(f"  {mode:<11} {variant:<22} {seconds * 1000:8.2f} ms {cpu * 1000:8.2f} ms CPU", file=sys.stderr)

    modes: list[tuple[str, Callable[[list[str]], float]]] = [
        ("pipe", lambda command: pipe_mode(command, runs)),
        ("socketpair", lambda command: per_connection(lambda: socketpair_once(command), runs)),
        ("tcp", lambda command: _tcp(command, runs)),
    ]
    for mode, run in modes:
        row(mode, "reference", run, reference)
        row(mode, "ours, no server", run, ours)
        with our_server(keys, work / f"server-{mode}.log"):
            row(mode, "ours, server running", run, ours)
    return rows


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _tcp(command: list[str], runs: int) -> float:
    with activated(command) as port:
        return per_connection(lambda: tcp_once(port), runs)


def table(rows: list[dict[str, object]]) -> str:
    def figure(row: dict[str, object], name: str) -> float:
        return float(str(row[name]))

    wall = {row["mode"]: figure(row, "ms_per_connection") for row in rows if row["tangd"] == "reference"}
    cpu = {row["mode"]: figure(row, "cpu_ms_per_connection") for row in rows if row["tangd"] == "reference"}
    lines = [f"{'mode':<11} {'tangd':<22} {'wall ms/conn':>12} {'x ref':>6} {'CPU ms/conn':>12} {'x ref':>6}"]
    for row in rows:
        ms, cpu_ms = figure(row, "ms_per_connection"), figure(row, "cpu_ms_per_connection")
        lines.append(f"{row['mode']!s:<11} {row['tangd']!s:<22} {ms:12.2f} {ms / wall[row['mode']]:5.1f}x "
                     f"{cpu_ms:12.2f} {cpu_ms / cpu[row['mode']]:5.1f}x")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--runs", type=int, default=30, help="connections per figure (default: %(default)s)")
    options.add_argument("--output", type=Path, help="also write the figures as JSON here")
    options.add_argument("--tangd", type=Path, default=BIN / "tangd", help="our launcher (default: %(default)s)")
    args = options.parse_args()
    missing = [tool for tool in ("systemd-socket-activate", REFERENCE_TANGD) if not shutil.which(tool)]
    if missing:
        print(f"missing: {missing}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="tang-inetd-bench-") as temporary:
        work = Path(temporary)
        keys = work / "keys"
        keys.mkdir()
        subprocess.run([REFERENCE_KEYGEN, str(keys)], check=True, capture_output=True)
        rows = measure(keys, work, args.runs, args.tangd)
    print(table(rows))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        document = {"runs": args.runs, "tangd": str(args.tangd), "rows": rows}
        args.output.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
