"""The access log's lines, formatted in batches, against formatting written independently here: `datetime` for the
timestamp, integer arithmetic for the duration, `json.loads` for the escaped target; and its writes, read from a
SOCK_SEQPACKET socket, which keeps each write a message of its own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import select
import socket
import threading
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from tang_server.http.accesslog import MAX_BUFFERED, MAX_REMEMBERED_TARGETS, MAX_TARGET, AccessLog, Entry

PLAIN = re.compile(
    r'^(?P<time>\S+) (?P<client>\S+) "(?P<method>[A-Z]+) (?P<target>(?:[^"\\]|\\.)*) HTTP/(?P<version>[\d.]+)" '
    r"(?P<status>\d{3}) (?P<ms>\d+\.\d{3})ms$"
)

# Times and durations a quarter of the last digit away from a rounding boundary: the expectation is then exact.
MILLISECONDS = st.integers(min_value=0, max_value=4_102_444_800_000)  # up to 2100
MICROSECONDS = st.integers(min_value=0, max_value=600_000_000)
ENTRY = st.tuples(
    MILLISECONDS,
    st.sampled_from(["127.0.0.1", "2001:db8::1", "10.0.0.7"]),
    st.sampled_from(["GET", "POST", "HEAD"]),
    st.one_of(st.binary(max_size=300), st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E)).map(str.encode)),
    st.sampled_from(["1.0", "1.1"]),
    st.sampled_from([200, 400, 404, 405, 413, 414, 500, 503]),
    MICROSECONDS,
)


def expected_fields(entry: tuple[int, str, str, bytes, str, int, int]) -> dict[str, str]:
    milliseconds, client, method, target, version, status, microseconds = entry
    when = datetime.fromtimestamp(milliseconds // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return {
        "time": f"{when}.{milliseconds % 1000:03d}Z",
        "client": client,
        "method": method,
        "target": target[:MAX_TARGET].decode("latin-1"),
        "version": version,
        "status": str(status),
        "ms": f"{microseconds // 1000}.{microseconds % 1000:03d}",
    }


def messages_written(entries: list[Entry], fmt: str = "plain") -> list[bytes]:
    """What one flush of these entries writes, one message per write (read while written: a full socket blocks)."""
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    messages: list[bytes] = []
    reading = threading.Thread(target=lambda: messages.extend(iter(lambda: reader.recv(1 << 16), b"")))
    with reader, writer:
        reading.start()
        log = AccessLog(writer.fileno(), fmt=fmt)
        log._entries.extend(entries)  # what `record` appends, with the time chosen here
        log.flush()
        writer.shutdown(socket.SHUT_WR)
        reading.join()
    return messages


def formatted(entries: list[tuple[int, str, str, bytes, str, int, int]], fmt: str) -> list[str]:
    chosen = [((milliseconds + 0.25) / 1000, client, method, target, version, status, (microseconds + 0.25) / 1e6)
              for milliseconds, client, method, target, version, status, microseconds in entries]  # fmt: skip
    return b"".join(messages_written(chosen, fmt)).decode("ascii").splitlines()


@settings(max_examples=200, deadline=None)
@given(st.lists(ENTRY, max_size=30))
def test_plain_lines_match_an_independent_formatting(entries: list[tuple[int, str, str, bytes, str, int, int]]) -> None:
    lines = formatted(entries, "plain")
    assert len(lines) == len(entries)
    for line, entry in zip(lines, entries, strict=True):
        assert line.isascii() and line.isprintable(), line
        found = PLAIN.match(line)
        assert found, line
        fields = found.groupdict()
        fields["target"] = json.loads(f'"{fields["target"]}"')  # escaped as a JSON string body, or not at all
        assert fields == expected_fields(entry)


@settings(max_examples=200, deadline=None)
@given(st.lists(ENTRY, max_size=30))
def test_json_lines_match_an_independent_formatting(entries: list[tuple[int, str, str, bytes, str, int, int]]) -> None:
    lines = formatted(entries, "json")
    assert len(lines) == len(entries)
    for line, entry in zip(lines, entries, strict=True):
        assert line.isascii() and line.isprintable(), line
        document = json.loads(line)
        wanted = expected_fields(entry)
        assert document == {
            "time": wanted["time"],
            "client": wanted["client"],
            "method": wanted["method"],
            "target": wanted["target"],
            "http_version": wanted["version"],
            "status": int(wanted["status"]),
            "duration_ms": float(wanted["ms"]),
        }
        assert f'"duration_ms":{wanted["ms"]}}}' in line  # three decimals, as in the plain format


def test_writes_are_whole_lines_of_at_most_pipe_buf_bytes() -> None:
    """Each write is one message here: none longer than PIPE_BUF (so never interleaved with another worker's on a
    pipe), each ending at a line's end, and together every line in order."""
    targets = [f"/rec/{'k' * (n % 200)}{n}".encode() for n in range(1000)]
    entries = [(1_700_000_000.0 + n / 1000, "127.0.0.1", "POST", target, "1.1", 200, 0.0001)
               for n, target in enumerate(targets)]  # fmt: skip
    messages = messages_written(entries)
    assert len(messages) > 1
    assert all(len(message) <= select.PIPE_BUF and message.endswith(b"\n") for message in messages)
    lines = b"".join(messages).decode().splitlines()
    assert [PLAIN.match(line)["target"] for line in lines] == [target.decode() for target in targets]  # type: ignore[index]


def test_a_full_buffer_is_written_without_waiting_for_the_timer() -> None:
    read_end, write_end = os.pipe()

    async def record(count: int) -> bytes:
        log = AccessLog(write_end, flush_seconds=3600)  # the timer never fires within the test
        for _ in range(count):
            log.record("127.0.0.1", "GET", b"/adv", "1.1", 200, 0.0001)
        try:
            return os.read(read_end, 1 << 20)
        except BlockingIOError:
            return b""
        finally:
            log._entries.clear()  # nothing left for its flush at exit, when this pipe is closed

    os.set_blocking(read_end, False)
    try:
        assert asyncio.run(record(MAX_BUFFERED - 1)) == b""  # below the bound: buffered
        written = asyncio.run(record(MAX_BUFFERED))
        assert written.count(b"\n") == MAX_BUFFERED
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_line_is_written_by_the_timer_while_the_loop_runs() -> None:
    """Below the buffer's bound, a line goes out when the flush timer fires, while the worker goes on serving: not
    only when the process exits (`flushtimer.FlushTimer`). Then the timer is armed again for the next line."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)

    async def written_while_running() -> list[bytes]:
        log = AccessLog(write_end, flush_seconds=0.05)
        seen = []
        for target in (b"/adv/first", b"/adv/second"):
            log.record("127.0.0.1", "GET", target, "1.1", 200, 0.0001)
            data = b""
            async with asyncio.timeout(30):  # bounds a hang; the timer fires long before
                while not data.endswith(b"\n"):
                    await asyncio.sleep(0.01)
                    with contextlib.suppress(BlockingIOError):
                        data += os.read(read_end, 1 << 16)
            seen.append(data)
        return seen

    try:
        first, second = asyncio.run(written_while_running())
        assert b" /adv/first " in first and b" /adv/second " in second
    finally:
        os.close(read_end)
        os.close(write_end)


def test_remembered_targets_stay_right_past_the_bound() -> None:
    """The logged form of each target is remembered, up to MAX_REMEMBERED_TARGETS, then all forgotten at once:
    lines stay exact before, across and after that point, for targets that need escaping and targets that do not."""
    targets = [(f'/rec/"{n}\\\0é' if n % 2 else f"/rec/{n}").encode() for n in range(MAX_REMEMBERED_TARGETS + 300)]
    entries = [(1_700_000_000_000 + n, "127.0.0.1", "POST", targets[n % len(targets)], "1.1", 200, 123)
               for n in range(3 * len(targets))]  # fmt: skip
    lines = formatted(entries, "plain")
    assert len(lines) == len(entries)
    for line, entry in zip(lines, entries, strict=True):
        found = PLAIN.match(line)
        assert found, line
        fields = found.groupdict()
        fields["target"] = json.loads(f'"{fields["target"]}"')
        assert fields == expected_fields(entry)
