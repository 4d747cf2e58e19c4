"""A raw-socket fuzzer against a live server with several workers.

Requests start from valid Tang requests and the hostile table's cases, are mutated byte by byte and by token
(splices, truncations, repeated spans, swapped line ends, other numbers) and sent whole, in random fragments or
pipelined, then half-closed, left open or cut off with a reset. The oracle:

- everything the server sends is a sequence of well-formed HTTP/1.1 responses, each with an expected status
  (never 500: an exception in the server) and nothing after a `connection: close`;
- the server closes every connection within the request deadline plus the keep-alive time (or the lingering
  close after a refusal);
- the workers live through it (same processes), their memory does not grow, and the log shows no traceback;
- afterwards /adv and /rec still answer correctly.

`make test` runs it for a few seconds (TANG_FUZZ_SECONDS, default 10); `make fuzz` runs it for longer. The run's
seed is printed first and named in every failure: `TANG_FUZZ_SEED=S` replays the same cases (the server's keys and
the client key are derived from it too, so the bytes are the same), and `TANG_FUZZ_CASE=N` plays case N alone.

Before any generated case, the corpus (`tests/fuzz-corpus/*.json`) runs: the cases that found bugs, each with the
exact statuses it must get.
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
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from tang_server.http.protocol import LINGER_SECONDS
from tang_server.keys import b64

from .support import client_key, our_server, request, thumbprint, worker_rss
from .test_hostile import cases as hostile_cases

CORPUS = Path(__file__).resolve().parent / "fuzz-corpus"

FUZZ_SECONDS = float(os.environ.get("TANG_FUZZ_SECONDS", "10"))
REQUEST_TIMEOUT = 1.0
KEEP_ALIVE = 1.0
# The server must have closed every connection by then: a request deadline, a keep-alive period or the lingering
# close after a refusal, and slack for a loaded machine.
CONNECTION_DEADLINE = REQUEST_TIMEOUT + max(KEEP_ALIVE, LINGER_SECONDS) + 6.0
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


def seeded_key(rng: random.Random, alg: str, key_ops: list[str]) -> dict[str, Any]:
    """A P-521 JWK (private) drawn from `rng`: the same seed, the same key."""
    numbers = ec.derive_private_key(rng.randrange(1, 2**520), ec.SECP521R1()).private_numbers()
    return {
        "alg": alg,
        "crv": "P-521",
        "kty": "EC",
        "key_ops": key_ops,
        "x": b64.encode(numbers.public_numbers.x.to_bytes(66, "big")),
        "y": b64.encode(numbers.public_numbers.y.to_bytes(66, "big")),
        "d": b64.encode(numbers.private_value.to_bytes(66, "big")),
    }


def seed_requests(exchange_kid: str, signing_kid: str, client: dict[str, Any]) -> list[bytes]:
    """Valid Tang requests and the hostile table's cases; `client` is the client key posted (with its `d`)."""
    body = json.dumps({name: value for name, value in client.items() if name != "d"}).encode()
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
    return valid + [data for _, data, _ in hostile_cases(exchange_kid, client)]


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


#: A fragment's pause: wait until the server has answered what was sent so far.
AFTER_ANSWER = -1.0


@dataclass
class Case:
    name: str  # "seed S case N", or the corpus file
    data: bytes
    fragments: list[tuple[bytes, float]]  # (bytes, pause before sending them: seconds, or AFTER_ANSWER)
    ending: str  # "half-close", "wait" or "reset"
    expect: list[int] | None = None  # the exact statuses (corpus cases)


def generate(seed: int, seeds: list[bytes], number: int) -> Case:
    """Case `number` of a run: drawn from its own generator, so that it can be replayed alone."""
    rng = random.Random(f"{seed}/{number}")  # noqa: S311  # reproducible test input, not secrets
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
    return Case(f"seed {seed} case {number} (replay: TANG_FUZZ_SEED={seed} TANG_FUZZ_CASE={number})", data,
                fragments, ending)  # fmt: skip


def corpus(exchange_kid: str, signing_kid: str) -> list[Case]:
    """The cases that found bugs (`tests/fuzz-corpus`), key ids filled in."""
    found = []
    for path in sorted(CORPUS.glob("*.json")):
        entry = json.loads(path.read_text())

        def text(value: str) -> bytes:
            return value.replace("{exchange_kid}", exchange_kid).replace("{signing_kid}", signing_kid).encode("latin-1")

        fragments = [(text(f["send"]), AFTER_ANSWER if f.get("after") == "answer" else float(f.get("after", 0)))
                     for f in entry["fragments"]]  # fmt: skip
        data = b"".join(piece for piece, _ in fragments)
        found.append(Case(f"corpus {path.name}", data, fragments, entry["ending"], entry["expect"]))
    return found


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


def _answered(data: bytes) -> bool:
    """A whole response (head and declared body) is in `data`."""
    head, found, body = data.partition(b"\r\n\r\n")
    if not found:
        return False
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    return len(body) >= (int(length.group(1)) if length else 0)


def play(port: int, case: Case) -> Outcome:
    began = time.monotonic()
    received, reset = b"", False
    with socket.create_connection(("127.0.0.1", port), timeout=CONNECTION_DEADLINE) as conn:
        try:
            for piece, pause in case.fragments:
                if pause == AFTER_ANSWER:
                    while not _answered(received) and (chunk := conn.recv(65536)):
                        received += chunk
                else:
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
    if case.expect is not None and statuses != case.expect:
        raise Malformed(f"statuses {statuses}, expected {case.expect}")
    kind = "answered" if statuses else ("reset by server" if reset else "closed")
    return Outcome(statuses, kind)


def fuzz(port: int, cases: Iterator[Case]) -> tuple[Counter[str], list[str]]:
    """Plays cases on CONCURRENCY connections until `cases` ends; returns the tallies and the failures."""
    tally: Counter[str] = Counter()
    failures: list[str] = []
    pending: dict[Future[Outcome], Case] = {}
    exhausted = False
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        while not exhausted or pending:
            while not exhausted and len(pending) < CONCURRENCY:
                case = next(cases, None)
                if case is None:
                    exhausted = True
                else:
                    pending[pool.submit(play, port, case)] = case
            done, _ = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            for future in done:
                case = pending.pop(future)
                try:
                    outcome = future.result()
                except (Malformed, OSError) as error:
                    failures.append(f"{case.name} ({case.ending}): {error}; {case.data[:300]!r}")
                    continue
                tally["cases"] += 1
                tally[outcome.kind] += 1
                tally.update(f"status {status}" for status in outcome.statuses)
    return tally, failures


def generated(seed: int, seeds: list[bytes], first: int, seconds: float) -> Iterator[Case]:
    """Cases first, first + 1, ... of a run, for `seconds`."""
    deadline = time.monotonic() + seconds
    number = first
    while time.monotonic() < deadline:
        yield generate(seed, seeds, number)
        number += 1


@dataclass
class Target:
    port: int
    parent: int
    seeds: list[bytes]
    corpus: list[Case]


@contextlib.contextmanager
def fuzz_target(base: Path, seed: int) -> Iterator[Target]:
    """A two-worker server on keys derived from `seed`, and the requests the cases start from."""
    rng = random.Random(seed)  # noqa: S311  # reproducible test input, not secrets
    signing = seeded_key(rng, "ES512", ["sign", "verify"])
    exchange = seeded_key(rng, "ECMR", ["deriveKey"])
    client = seeded_key(rng, "ECMR", ["deriveKey"])
    (base / "keys").mkdir()
    for key in (signing, exchange):
        (base / "keys" / f"{thumbprint(key)}.jwk").write_text(json.dumps(key))
    limits = ["--request-timeout", str(REQUEST_TIMEOUT), "--keep-alive-seconds", str(KEEP_ALIVE),
              "--max-header-bytes", "8192"]  # fmt: skip
    with our_server(base / "keys", base / "server.log", *limits, workers=2) as server:
        yield Target(server.port, server.process.pid,
                     seed_requests(thumbprint(exchange), thumbprint(signing), client),
                     corpus(thumbprint(exchange), thumbprint(signing)))  # fmt: skip
        body = json.dumps(client_key()).encode()
        assert request(server.port, "POST", f"/rec/{thumbprint(exchange)}", body).status == 200
        assert request(server.port, "GET", "/adv").status == 200
        log = server.log_text()
    assert "Traceback" not in log and "Exception" not in log, log[-3000:]


def test_raw_socket_fuzz(tmp_path: Path) -> None:
    seed = int(os.environ.get("TANG_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
    print(f"raw-socket fuzz: seed {seed} (replay: TANG_FUZZ_SEED={seed})", flush=True)
    only = os.environ.get("TANG_FUZZ_CASE")
    with fuzz_target(tmp_path, seed) as target:
        assert target.corpus, "the corpus of past findings is missing"
        tally, failures = fuzz(target.port, iter(target.corpus))  # past findings first
        assert tally["cases"] + len(failures) == len(target.corpus)
        if only is not None:
            more, more_failures = fuzz(target.port, iter([generate(seed, target.seeds, int(only))]))
            tally += more
            failures += more_failures
        else:
            warm_up = min(60.0, FUZZ_SECONDS / 4)  # memory settles in the first minute (allocator pools, caches)
            cases = generated(seed, target.seeds, 0, warm_up)
            more, more_failures = fuzz(target.port, cases)
            before = worker_rss(target.parent)
            rest, rest_failures = fuzz(target.port, generated(seed, target.seeds, more["cases"] + len(more_failures),
                                                              FUZZ_SECONDS - warm_up))  # fmt: skip
            after = worker_rss(target.parent)
            tally += more + rest
            failures += more_failures + rest_failures
    print(f"raw-socket fuzz, seed {seed}, {FUZZ_SECONDS:.0f} s:", dict(sorted(tally.items())))
    assert failures == [], f"seed {seed}:\n" + "\n".join(failures)
    assert tally["cases"] > 0 and tally["answered"] > 0, f"seed {seed}"
    if only is None:
        assert set(after) == set(before) and len(before) == 2, f"seed {seed}: a worker died"
        # Memory settles during the first minute (allocator pools, caches: +6 MiB within 10 s was seen), so growth
        # says something only about a run whose warm-up is that minute: `make fuzz`, not make test's short smoke.
        if warm_up >= 60.0:
            for pid, size in before.items():
                assert after[pid] - size < 4096, f"seed {seed}: worker {pid} grew from {size} to {after[pid]} KiB"
