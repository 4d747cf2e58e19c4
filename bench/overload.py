"""Overload: /rec offered at a multiple of the saturation rate, open loop, with and without backpressure.

    python bench/overload.py [--seconds 2] [--factor 2] [--queue-ms 0 1000 100] [--connections 18000]

A boot storm is an open loop: machines do not wait for each other's unlocks. So the load generator here (this
script, asyncio on uvloop) starts requests on a fixed schedule whatever the server does. One worker is pinned to
the server CPU and the generator to the other. Saturation is measured first with wrk (closed loop, kept-alive
connections); then, for each `--max-queue-ms` setting (0 = backpressure off), the schedule offers `factor`
times that rate.

Every request has a connection of its own, as every machine in a storm does, but the connections are opened
before the schedule starts (up to `--connections`; the server is told to keep them): a Python generator on
one core cannot open connections at twice the server's rate (measured: it fell seconds behind its schedule),
and the cost of accepting them is not what is measured here. So the queue forms in the server, where a real
storm's queue is, not in the generator. Latency counts from the scheduled start of each request, so a
generator falling behind cannot hide queueing; its worst lag is reported. A request with no answer within the
client timeout (10 s) counts as failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import uvloop

from load import HERE, free_port, prepare_keys, serve_command, started, wrk

SERVER_CPU = "1"
LOAD_CPU = "0"
CLIENT_TIMEOUT = 10.0


class Connection(asyncio.Protocol):
    """One kept-alive client connection: sends a request, resolves its status (0 if closed without one)."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.received = b""
        self.waiting: Callable[[int], None] | None = None
        self.reusable = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio's classes
        self.pool.idle(self)

    def send(self, request: bytes, done: Callable[[int], None]) -> None:
        assert self.transport is not None
        self.waiting = done
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.received += data
        head, found, body = self.received.partition(b"\r\n\r\n")
        if not found:
            return
        lines = head.lower().split(b"\r\n")
        lengths = [line.split(b":", 1)[1] for line in lines if line.startswith(b"content-length:")]
        length = int(lengths[0]) if lengths else 0
        if len(body) >= length:
            self.received = body[length:]
            self.reusable = b"connection: close" not in lines
            self._finish(int(head.split(b" ", 2)[1]))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._finish(0)
        self.pool.lost(self)

    def _finish(self, status: int) -> None:
        if self.waiting is not None:
            done, self.waiting = self.waiting, None
            done(status)
            if self.transport is not None and self.reusable:
                self.pool.idle(self)


@dataclass
class Result:
    scheduled: float
    latency: float  # from the scheduled start to the answer
    status: int  # -1: no answer within the client timeout (counting time spent waiting for a connection)


class Pool:
    """Up to `size` kept-alive connections; a request due when none is free waits for one (that wait counts)."""

    def __init__(self, port: int, request: bytes, size: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.port, self.request, self.size = port, request, size
        self.free: deque[Connection] = deque()
        self.opened = 0
        self.backlog: deque[float] = deque()
        self.results: list[Result] = []
        self.outstanding = 0
        self.connecting: set[asyncio.Task[None]] = set()

    def submit(self, scheduled: float) -> None:
        self.outstanding += 1
        if self.free:
            self._start(self.free.pop(), scheduled)
            return
        self.backlog.append(scheduled)
        self._open_for_backlog()

    async def open(self, count: int) -> None:
        """Opens `count` connections ahead of the schedule: a storm's clients connect at no cost to this generator."""
        for first in range(0, count, 500):
            batch = min(count, first + 500) - first
            self.opened += batch
            await asyncio.gather(*(self._connect() for _ in range(batch)))

    async def _connect(self) -> None:
        """One more connection, already counted in `opened` (uncounted again if it fails)."""
        try:
            await self.loop.create_connection(lambda: Connection(self), "127.0.0.1", self.port)
        except OSError:
            self.opened -= 1

    def _open_for_backlog(self) -> None:
        if self.backlog and self.opened < self.size:
            self.opened += 1
            task = self.loop.create_task(self._connect())
            self.connecting.add(task)
            task.add_done_callback(self.connecting.discard)

    def idle(self, connection: Connection) -> None:
        now = time.monotonic()
        while self.backlog and now - self.backlog[0] > CLIENT_TIMEOUT:
            self._record(self.backlog.popleft(), -1)  # gave up before a connection was free
        if self.backlog:
            self._start(connection, self.backlog.popleft())
        else:
            self.free.append(connection)

    def lost(self, connection: Connection) -> None:
        self.opened -= 1
        with contextlib.suppress(ValueError):
            self.free.remove(connection)
        self._open_for_backlog()

    def _start(self, connection: Connection, scheduled: float) -> None:
        connection.send(self.request, lambda status: self._record(scheduled, status))

    def _record(self, scheduled: float, status: int) -> None:
        latency = time.monotonic() - scheduled
        self.results.append(Result(scheduled, latency, status if latency <= CLIENT_TIMEOUT else -1))
        self.outstanding -= 1


async def open_loop(
    port: int, request: bytes, rate: float, seconds: float, connections: int
) -> tuple[list[Result], float]:
    """Runs the schedule; returns the results and the generator's worst lag behind it."""
    pool = Pool(port, request, connections)
    total = int(rate * seconds)
    await pool.open(min(total, connections))
    start = time.monotonic() + 0.2
    index, worst_lag = 0, 0.0
    while index < total:
        now = time.monotonic()
        while index < total and start + index / rate <= now:
            worst_lag = max(worst_lag, now - (start + index / rate))
            pool.submit(start + index / rate)
            index += 1
        await asyncio.sleep(0.0005)
    deadline = time.monotonic() + CLIENT_TIMEOUT + 1
    while pool.outstanding and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    pool.results.extend(Result(s, CLIENT_TIMEOUT, -1) for s in pool.backlog)
    return pool.results, worst_lag


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def summary(results: list[Result], seconds: float, queue_ms: int, lag: float) -> dict[str, float]:
    statuses = Counter(r.status for r in results)
    ok = [r.latency for r in results if r.status == 200]
    answered = [r.latency for r in results if r.status > 0]
    total = len(results)
    first = min(r.scheduled for r in results)
    finished = max(r.scheduled + r.latency for r in results)
    return {
        "max_queue_ms": queue_ms,
        "offered_per_s": total / seconds,
        "ok_per_s": len(ok) / (finished - first),  # over the whole run, including draining the queue
        "ok_share": len(ok) / total,
        "shed_503_share": statuses[503] / total,
        "failed_share": sum(n for status, n in statuses.items() if status <= 0) / total,
        "other_share": sum(n for status, n in statuses.items() if status > 0 and status not in (200, 503)) / total,
        "ok_p50_ms": 1000 * percentile(ok, 0.5),
        "ok_p99_ms": 1000 * percentile(ok, 0.99),
        "answer_p99_ms": 1000 * percentile(answered, 0.99),
        "generator_worst_lag_ms": 1000 * lag,
        "mean_ok_ms": 1000 * statistics.fmean(ok) if ok else float("nan"),
    }


def markdown(saturation: float, factor: float, rows: list[dict[str, float]]) -> str:
    lines = [
        f"# /rec at {factor:.0f}x saturation, open loop\n",
        f"Saturation (wrk, closed loop, kept-alive, one worker): {saturation:.0f} req/s; "
        f"offered: {factor:.1f} x that.\n",
        "| --max-queue-ms | offered/s | 200/s | 200 | 503 | failed | 200 p50 | 200 p99 | any answer p99 "
        "| generator worst lag |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        setting = "off" if row["max_queue_ms"] == 0 else f"{row['max_queue_ms']:.0f}"
        lines.append(
            f"| {setting} | {row['offered_per_s']:.0f} | {row['ok_per_s']:.0f} | {row['ok_share']:.0%} "
            f"| {row['shed_503_share']:.0%} | {row['failed_share']:.0%} | {row['ok_p50_ms']:.0f} ms "
            f"| {row['ok_p99_ms']:.0f} ms | {row['answer_p99_ms']:.0f} ms | {row['generator_worst_lag_ms']:.1f} ms |"
        )
    lines.append(
        f"\nfailed: no answer within {CLIENT_TIMEOUT:.0f} s of the scheduled start. 200/s: over the whole run,"
    )
    lines.append("including the time to drain the queue after the schedule ended.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--factor", type=float, default=2.0)
    parser.add_argument("--queue-ms", type=int, nargs="+", default=[0, 1000, 100])
    parser.add_argument("--connections", type=int, default=18000, help="most client connections at once")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "overload.md")
    args = parser.parse_args(argv)

    os.sched_setaffinity(0, {int(LOAD_CPU)})
    # Every scheduled request holds a socket until answered, here and in the server.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        keys, rec_path, body = prepare_keys(Path(scratch))
        request = (
            f"POST {rec_path} HTTP/1.1\r\nHost: tang\r\nContent-Type: application/jwk+json\r\n"
            f"Content-Length: {len(body.read_bytes())}\r\n\r\n"
        ).encode() + body.read_bytes()
        port = free_port()
        with started(serve_command(keys, port, 1, "--no-access-log"), port, SERVER_CPU):
            closed_loop = wrk(f"http://127.0.0.1:{port}{rec_path}", seconds=args.seconds, connections=16,
                              cpus=LOAD_CPU, body=body, close=False)  # fmt: skip
        saturation = closed_loop["requests"] / (closed_loop["duration_us"] / 1e6)
        for queue_ms in args.queue_ms:
            port = free_port()
            # Connections opened ahead of the schedule must stay open until it reaches them.
            patient = ["--keep-alive-seconds", "300", "--request-timeout", "300"]
            command = serve_command(keys, port, 1, "--no-access-log", *patient, "--max-queue-ms", str(queue_ms))
            with started(command, port, SERVER_CPU):
                results, lag = uvloop.run(
                    open_loop(port, request, args.factor * saturation, args.seconds, args.connections)
                )
            rows.append(summary(results, args.seconds, queue_ms, lag))
            print(json.dumps(rows[-1]), flush=True)
            time.sleep(2)  # let the loopback's closed connections drain between runs
    report = markdown(saturation, args.factor, rows)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
