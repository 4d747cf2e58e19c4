"""A raw-socket fuzzer against a live server with several workers.

Requests start from valid Tang requests and the hostile table's cases, are mutated byte by byte and by token
(splices, truncations, repeated spans, swapped line ends, other numbers) and sent whole, in random fragments or
pipelined, then half-closed, left open or cut off with a reset. The oracle:

- everything the server sends is a sequence of well-formed HTTP/1.1 responses, each with an expected status
  (never 500: an exception in the server) and nothing after a `connection: close`;
- the server closes every connection within the request deadline plus the keep-alive time;
- the workers live through it (same processes), their memory does not grow, and the log shows no traceback;
- afterwards /adv and /rec still answer correctly.

`make test` runs it for a few seconds (TANG_FUZZ_SECONDS, default 10); `make fuzz` runs it for longer. A failure
names the run's seed and the case's number: `TANG_FUZZ_SEED=S` replays the same cases.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from tang_server import keyfiles

from .support import client_key, load_keys, our_server, request, thumbprint, worker_rss
from .test_hostile import cases as hostile_cases

FUZZ_SECONDS = float(os.environ.get("TANG_FUZZ_SECONDS", "10"))
REQUEST_TIMEOUT = 1.0
KEEP_ALIVE = 1.0
# The server must have closed every connection by then: a request deadline, a keep-alive period and slack for a
# loaded machine.
CONNECTION_DEADLINE = REQUEST_TIMEOUT + KEEP_ALIVE + 6.0
CONCURRENCY = 16
MAX_CASE_BYTES = 200_000
ALLOWED_STATUSES = frozenset({100, 200, 400, 403, 404, 405, 408, 411, 413, 414, 415, 431, 501, 505})

TOKENS = [
    b"\r\n", b"\r\n\r\n", b"\n", b"\r", b" ", b"\t", b":", b"\x00", b"\xff", b"\x7f", b"/", b"%", b"%00", b"%2f",
    b"?", b"#", b"..", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"GET ", b"POST ", b"PUT ", b"OPTIONS ", b"PRI * ",
    b"Host: ", b"Content-Length: ", b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: identity\r\n",
    b"Connection: close\r\n", b"Connection: keep-alive\r\n", b"Expect: 100-continue\r\n", b"Upgrade: h2c\r\n",
    b"X-Forwarded-For: 10.0.0.1\r\n", b"0\r\n\r\n", b"-1", b"0", b"65535", b"65536", b"4096",
    b"18446744073709551616", b"ffffffff", b"0x10", b'"', b"{", b"}", b"[", b"]", b",", b'"kty"', b'"EC"', b'"crv"',
    b'"P-521"', b'"x"', b'"y"', b'"d"', b"null", b"true", b"1e999", b"-0", b"\\u0000", b"\\ud800", b"/rec/",
    b"/adv/", b"/adv", b"/healthz", b"/metrics", b"/status",
]  # fmt: skip
NUMBERS = [b"0", b"1", b"-1", b"65535", b"65536", b"4095", b"4096", b"99999999999999999999", b"00000000001", b"1.5"]


def seed_requests(exchange_kid: str, signing_kid: str) -> list[bytes]:
    body = json.dumps(client_key()).encode()
    chunked_body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    valid = [
        b"GET /adv HTTP/1.1\r\nHost: t\r\n\r\n",
        f"GET /adv/{signing_kid} HTTP/1.1\r\nHost: t\r\n\r\n".encode(),
        f"POST /rec/{exchange_kid} HTTP/1.1\r\nHost: t\r\nContent-Type: application/jwk+json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body,
        f"POST /rec/{exchange_kid} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + chunked_body,
        f"POST /rec/{signing_kid} HTTP/1.0\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body,
        b"GET /healthz HTTP/1.1\r\n\r\n",
        b"GET /readyz HTTP/1.1\r\n\r\n",
        b"GET /status HTTP/1.1\r\nConnection: close\r\n\r\n",
    ]
    return valid + [data for _, data, _ in hostile_cases(exchange_kid)]


def mutations(rng: random.Random, seeds: list[bytes]) -> list[Callable[[bytes], bytes]]:
    def position(data: bytes) -> int:
        return rng.randrange(len(data) + 1)

    def span(data: bytes) -> tuple[int, int]:
        start = position(data)
        return start, min(len(data), start + rng.choice([1, 2, 4, 16, 64, 512]))

    def flip(data: bytes) -> bytes:
        at = position(data)
        return data[:at] + bytes([rng.randrange(256)]) + data[at + 1 :]

    def token(data: bytes) -> bytes:
        at = position(data)
        return data[:at] + rng.choice(TOKENS) + data[at:]

    def noise(data: bytes) -> bytes:
        at = position(data)
        return data[:at] + rng.randbytes(rng.randrange(1, 33)) + data[at:]

    def delete(data: bytes) -> bytes:
        start, end = span(data)
        return data[:start] + data[end:]

    def repeat(data: bytes) -> bytes:
        start, end = span(data)
        return data[:start] + data[start:end] * rng.choice([2, 3, 100, 2000]) + data[end:]

    def splice(data: bytes) -> bytes:
        other = rng.choice(seeds)
        return data[: position(data)] + other[rng.randrange(len(other) + 1) :]

    def truncate(data: bytes) -> bytes:
        return data[: position(data)]

    def line_ends(data: bytes) -> bytes:
        return data.replace(b"\r\n", rng.choice([b"\n", b"\r", b"\r\r\n", b"\n\r"]))

    def number(data: bytes) -> bytes:
        found = list(re.finditer(rb"\d+", data))
        if not found:
            return token(data)
        match = rng.choice(found)
        return data[: match.start()] + rng.choice(NUMBERS) + data[match.end() :]

    def case(data: bytes) -> bytes:
        start, end = span(data)
        return data[:start] + data[start:end].swapcase() + data[end:]

    return [flip, token, noise, delete, repeat, splice, truncate, line_ends, number, case]


@dataclass
class Case:
    number: int
    data: bytes
    fragments: list[tuple[bytes, float]]  # (bytes, pause before sending them)
    ending: str  # "half-close", "wait" or "reset"


def generate(rng: random.Random, seeds: list[bytes], number: int) -> Case:
    mutators = mutations(rng, seeds)
    data = rng.choice(seeds)
    for _ in range(rng.choice([0, 1, 1, 2, 2, 3, 4, 6])):
        data = rng.choice(mutators)(data)[:MAX_CASE_BYTES]
    if rng.random() < 0.2:  # pipelined behind another request
        data = (rng.choice(seeds) + data)[:MAX_CASE_BYTES]
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.choice([0, 0, 1, 2, 5])))) if data else []
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    fragments = [(piece, rng.uniform(0, 0.02) if index else 0.0) for index, piece in enumerate(pieces)]
    ending = rng.choices(["half-close", "wait", "reset"], weights=[6, 3, 1])[0]
    return Case(number, data, fragments, ending)


class Malformed(AssertionError):
    pass


def parse_responses(data: bytes, *, truncated: bool) -> list[int]:
    """The statuses of a stream of responses; `truncated` allows the last one to be cut short (a reset)."""
    statuses = []
    while data:
        head, found, rest = data.partition(b"\r\n\r\n")
        if not found:
            if truncated:
                break
            raise Malformed(f"incomplete response head {head[:200]!r}")
        status_line, *header_lines = head.split(b"\r\n")
        match = re.fullmatch(rb"HTTP/1\.1 (\d{3}) [\x20-\x7e]*", status_line)
        if not match:
            raise Malformed(f"bad status line {status_line[:200]!r}")
        headers = {}
        for line in header_lines:
            name, colon, value = line.partition(b": ")
            if not colon or not re.fullmatch(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
                raise Malformed(f"bad header line {line[:200]!r}")
            headers[name.lower()] = value
        status = int(match.group(1))
        statuses.append(status)
        if status < 200:
            data = rest
            continue
        if b"content-length" not in headers:
            raise Malformed(f"{status} without content-length")
        length = int(headers[b"content-length"])
        if len(rest) < length and not truncated:
            raise Malformed(f"{status} body shorter than its content-length")
        data = rest[length:]
        if headers.get(b"connection") == b"close" and data:
            raise Malformed(f"{len(data)} bytes after a connection: close response")
    return statuses


@dataclass
class Outcome:
    statuses: list[int] = field(default_factory=list)
    kind: str = "answered"  # or "closed" (no answer), "reset by us", "reset by server"


def play(port: int, case: Case) -> Outcome:
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=CONNECTION_DEADLINE) as conn:
        try:
            for piece, pause in case.fragments:
                time.sleep(pause)
                conn.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed before we finished: what was answered is still checked
        if case.ending == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return Outcome(kind="reset by us")
        if case.ending == "half-close":
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)
        received, reset = b"", False
        try:
            while True:
                conn.settimeout(max(0.01, began + CONNECTION_DEADLINE - time.monotonic()))
                chunk = conn.recv(65536)
                if not chunk:
                    break
                received += chunk
        except ConnectionResetError:
            reset = True  # closed with our unread bytes pending: Linux sends a reset, which may eat the answer
        except TimeoutError:
            raise Malformed(f"connection still open after {CONNECTION_DEADLINE} s") from None
    statuses = parse_responses(received, truncated=reset or b"HEAD" in case.data.upper())
    unexpected = [status for status in statuses if status not in ALLOWED_STATUSES]
    if unexpected:
        raise Malformed(f"unexpected statuses {unexpected}")
    kind = "answered" if statuses else ("reset by server" if reset else "closed")
    return Outcome(statuses, kind)


def fuzz(port: int, seeds: list[bytes], seed: int, seconds: float) -> tuple[Counter[str], list[str]]:
    """Plays generated cases on CONCURRENCY connections for `seconds`; returns the tallies and the failures."""
    rng = random.Random(seed)  # noqa: S311  # reproducible test input, not secrets
    tally: Counter[str] = Counter()
    failures: list[str] = []
    deadline = time.monotonic() + seconds
    pending: dict[Future[Outcome], Case] = {}
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        number = 0
        while time.monotonic() < deadline or pending:
            while time.monotonic() < deadline and len(pending) < CONCURRENCY:
                case = generate(rng, seeds, number)
                pending[pool.submit(play, port, case)] = case
                number += 1
            done, _ = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            for future in done:
                case = pending.pop(future)
                try:
                    outcome = future.result()
                except (Malformed, OSError) as error:
                    failures.append(f"seed {seed} case {case.number} ({case.ending}): {error}; {case.data[:300]!r}")
                    continue
                tally["cases"] += 1
                tally[outcome.kind] += 1
                tally.update(f"status {status}" for status in outcome.statuses)
    return tally, failures


@contextlib.contextmanager
def fuzz_target(base: Path) -> Iterator[tuple[int, int, list[bytes]]]:
    keyfiles.generate_keys(base / "keys")
    signing, exchange = load_keys(base / "keys")
    limits = ["--request-timeout", str(REQUEST_TIMEOUT), "--keep-alive-seconds", str(KEEP_ALIVE),
              "--max-header-bytes", "8192"]  # fmt: skip
    with our_server(base / "keys", base / "server.log", *limits, workers=2) as server:
        yield server.port, server.process.pid, seed_requests(thumbprint(exchange), thumbprint(signing))
        body = json.dumps(client_key()).encode()
        assert request(server.port, "POST", f"/rec/{thumbprint(exchange)}", body).status == 200
        assert request(server.port, "GET", "/adv").status == 200
        log = server.log_text()
    assert "Traceback" not in log and "Exception" not in log, log[-3000:]


def test_raw_socket_fuzz(tmp_path: Path) -> None:
    seed = int(os.environ.get("TANG_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
    with fuzz_target(tmp_path) as (port, parent, seeds):
        warm_up = min(60.0, FUZZ_SECONDS / 4)  # memory settles in the first minute (allocator pools, caches)
        tally, failures = fuzz(port, seeds, seed, warm_up)
        before = worker_rss(parent)
        more, more_failures = fuzz(port, seeds, seed + 1, FUZZ_SECONDS - warm_up)
        after = worker_rss(parent)
    tally += more
    print(f"raw-socket fuzz, seeds {seed} and {seed + 1}, {FUZZ_SECONDS:.0f} s:", dict(sorted(tally.items())))
    assert failures + more_failures == [], "\n".join(failures + more_failures)
    assert tally["cases"] > 0 and tally["answered"] > 0
    assert set(after) == set(before) and len(before) == 2, "a worker died"
    for pid, size in before.items():
        assert after[pid] - size < 4096, f"worker {pid} grew from {size} to {after[pid]} KiB"
