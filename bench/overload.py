"""Overload: /rec offered at a multiple of the saturation rate, open loop, with and without backpressure.

    python bench/overload.py [--seconds 8] [--factor 2] [--queue-ms 0 1000 100] [--output bench/results/overload.md]

A boot storm is an open loop: machines do not wait for each other's unlocks. So the load generator here (this
script, asyncio on uvloop) starts requests on a fixed schedule whatever the server does, each on a new
connection with `Connection: close`, as clevis's curl does. One worker is pinned to the server CPU and the
generator to the other. Saturation is measured first with wrk (closed loop, a new connection per request); then,
for each `--max-queue-ms` setting (0 = backpressure off), the schedule offers `factor` times that rate.

Latency counts from the scheduled start of each request, so a generator falling behind cannot hide queueing
(its own lag is reported). A request with no answer within the client timeout counts as failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import uvloop

from load import HERE, free_port, prepare_keys, serve_command, started, wrk

SERVER_CPU = "1"
LOAD_CPU = "0"
CLIENT_TIMEOUT = 10.0


class OneRequest(asyncio.Protocol):
    """Sends one request and resolves `answer` with the response's status (0 if closed without one)."""

    def __init__(self, request: bytes, answer: asyncio.Future[int]) -> None:
        self.request = request
        self.answer = answer
        self.received = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.received += data
        head, found, body = self.received.partition(b"\r\n\r\n")
        if not found:
            return
        lines = head.lower().split(b"\r\n")
        lengths = [line.split(b":", 1)[1] for line in lines if line.startswith(b"content-length:")]
        length = int(lengths[0]) if lengths else 0
        if len(body) >= length and not self.answer.done():
            self.answer.set_result(int(head.split(b" ", 2)[1]))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_result(0)


@dataclass
class Result:
    scheduled: float
    lag: float  # how late the generator started it
    latency: float  # from the scheduled start to the answer (or the failure)
    status: int  # -1: no answer within the client timeout, -2: connection refused or reset, 0: closed


async def one(port: int, request: bytes, scheduled: float, results: list[Result]) -> None:
    loop = asyncio.get_running_loop()
    began = loop.time()
    answer: asyncio.Future[int] = loop.create_future()
    transport = None
    try:
        async with asyncio.timeout(CLIENT_TIMEOUT):
            transport, _ = await loop.create_connection(lambda: OneRequest(request, answer), "127.0.0.1", port)
            status = await answer
    except TimeoutError:
        status = -1
    except OSError:
        status = -2
    finally:
        if transport is not None:
            transport.close()
    results.append(Result(scheduled, began - scheduled, loop.time() - scheduled, status))


async def open_loop(port: int, request: bytes, rate: float, seconds: float) -> list[Result]:
    loop = asyncio.get_running_loop()
    results: list[Result] = []
    tasks = set()
    total = int(rate * seconds)
    start = loop.time() + 0.2
    index = 0
    while index < total:
        now = loop.time()
        while index < total and start + index / rate <= now:
            task = asyncio.create_task(one(port, request, start + index / rate, results))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            index += 1
        await asyncio.sleep(0.0005)
    await asyncio.gather(*tasks)
    return results


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def summary(results: list[Result], seconds: float, queue_ms: int) -> dict[str, float]:
    statuses = Counter(r.status for r in results)
    ok = [r.latency for r in results if r.status == 200]
    answered = [r.latency for r in results if r.status > 0]
    total = len(results)
    return {
        "max_queue_ms": queue_ms,
        "offered_per_s": total / seconds,
        "ok_per_s": len(ok) / seconds,
        "ok_share": len(ok) / total,
        "shed_503_share": statuses[503] / total,
        "failed_share": sum(n for status, n in statuses.items() if status <= 0) / total,
        "other_share": sum(n for status, n in statuses.items() if status > 0 and status not in (200, 503)) / total,
        "ok_p50_ms": 1000 * percentile(ok, 0.5),
        "ok_p99_ms": 1000 * percentile(ok, 0.99),
        "answer_p99_ms": 1000 * percentile(answered, 0.99),
        "generator_lag_p99_ms": 1000 * percentile([r.lag for r in results], 0.99),
        "mean_ok_ms": 1000 * statistics.fmean(ok) if ok else float("nan"),
    }


def markdown(saturation: float, factor: float, rows: list[dict[str, float]]) -> str:
    lines = [
        f"# /rec at {factor:.0f}x saturation, open loop, new connection per request\n",
        f"Saturation (wrk, closed loop, one worker): {saturation:.0f} req/s; offered: {factor:.1f} x that.\n",
        "| --max-queue-ms | offered/s | 200/s | 200 | 503 | failed | 200 p50 | 200 p99 | any answer p99 "
        "| generator lag p99 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        setting = "off" if row["max_queue_ms"] == 0 else f"{row['max_queue_ms']:.0f}"
        lines.append(
            f"| {setting} | {row['offered_per_s']:.0f} | {row['ok_per_s']:.0f} | {row['ok_share']:.0%} "
            f"| {row['shed_503_share']:.0%} | {row['failed_share']:.0%} | {row['ok_p50_ms']:.0f} ms "
            f"| {row['ok_p99_ms']:.0f} ms | {row['answer_p99_ms']:.0f} ms | {row['generator_lag_p99_ms']:.1f} ms |"
        )
    lines.append(f"\nfailed: no answer within {CLIENT_TIMEOUT:.0f} s, or the connection refused or reset.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--factor", type=float, default=2.0)
    parser.add_argument("--queue-ms", type=int, nargs="+", default=[0, 1000, 100])
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
            f"POST {rec_path} HTTP/1.1\r\nHost: tang\r\nConnection: close\r\nContent-Type: application/jwk+json\r\n"
            f"Content-Length: {len(body.read_bytes())}\r\n\r\n"
        ).encode() + body.read_bytes()
        port = free_port()
        with started(serve_command(keys, port, 1, "--no-access-log"), port, SERVER_CPU):
            closed_loop = wrk(f"http://127.0.0.1:{port}{rec_path}", seconds=args.seconds, connections=16,
                              cpus=LOAD_CPU, body=body, close=True)  # fmt: skip
        saturation = closed_loop["requests"] / (closed_loop["duration_us"] / 1e6)
        for queue_ms in args.queue_ms:
            port = free_port()
            command = serve_command(keys, port, 1, "--no-access-log", "--max-queue-ms", str(queue_ms))
            with started(command, port, SERVER_CPU):
                results = uvloop.run(open_loop(port, request, args.factor * saturation, args.seconds))
            rows.append(summary(results, args.seconds, queue_ms))
            print(json.dumps(rows[-1]), flush=True)
            time.sleep(2)  # let the loopback's closed connections drain between runs
    report = markdown(saturation, args.factor, rows)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
