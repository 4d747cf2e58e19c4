"""Distinct clients per key over the last day, estimated with HyperLogLog, without keeping any address.

A `Sketch` is a HyperLogLog of `REGISTERS` one-byte registers (precision `PRECISION`): adding the same address
twice changes nothing, the union of two sketches is their register-wise maximum (exactly the sketch of the union
of their addresses), and the estimate's relative standard error is `STANDARD_ERROR` (1.04/sqrt(2^p), about 2.3%;
below 2.5 x 2^p addresses the estimate is linear counting, much closer than that).

Addresses are hashed with BLAKE2b keyed by a random secret of the server (`shared_secret`: one file in the
multiprocess directory, so that every worker hashes alike and their sketches merge): registers say nothing about
an address to whoever lacks that secret, and no address is kept once its batch is hashed.

The window (`Window`) is made of one sketch per clock hour (hours since the Unix epoch, so UTC hours): a client
counts when it recovered during the current hour or one of the `HOURS - 1` before it, that is within the last
23 to 24 hours; older hours are dropped whole.

Across workers, each worker writes its window to `tang_clients_<pid>.hll` in the multiprocess directory at each
flush that changed it (a temporary file, then `os.replace`: a reader sees the old file or the new one), and the
worker answering a scrape merges every file (`gather`). A worker that died still counts for the hours of its
window (its clients were real); its file is removed by the first scrape after its last hour left the window.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import secrets
import struct
import threading
from collections.abc import Callable, Iterable, Mapping

PRECISION = 11
REGISTERS = 1 << PRECISION
#: Relative standard error of an estimate (large counts; linear counting does better below 2.5 x REGISTERS).
STANDARD_ERROR = 1.04 / math.sqrt(REGISTERS)
HOUR = 3600
#: Hourly sketches in a window: the current hour and the 23 before it.
HOURS = 24
SECRET_FILE = "tang_clients.key"  # noqa: S105 - a file name
SECRET_BYTES = 32

_FILE = re.compile(r"^tang_clients_(\d+)\.hll$")
_TEMPORARY = re.compile(r"^tang_clients_(\d+)\.hll\.[0-9a-f]+\.tmp$")
_HEADER = struct.Struct("<8sBq")  # magic, precision, the hour the file was written in
_RECORD = struct.Struct("<BqH")  # kind, hour, length of the key id (then the key id, then the registers)
_MAGIC = b"TANGHLL1"
_UNION, _BUCKET = 0, 1
_HASHED_BITS = 64 - PRECISION
_ALPHA = 0.7213 / (1 + 1.079 / REGISTERS)
_INVERSE_POWERS = [2.0**-rank for rank in range(256)]  # any byte: a damaged file must not break a scrape


class Sketch:
    """A HyperLogLog: one byte per register, holding the highest rank (leading zeros + 1) seen in its bucket."""

    __slots__ = ("registers",)

    def __init__(self, registers: bytes | bytearray | None = None) -> None:
        self.registers = bytearray(REGISTERS) if registers is None else bytearray(registers)
        if len(self.registers) != REGISTERS:
            raise ValueError(f"a sketch has {REGISTERS} registers, not {len(self.registers)}")

    def add(self, hashed: int) -> None:
        """Adds a 64-bit hash: its first PRECISION bits pick a register, the rest give the rank."""
        index = hashed >> _HASHED_BITS
        rank = _HASHED_BITS - (hashed & ((1 << _HASHED_BITS) - 1)).bit_length() + 1
        if rank > self.registers[index]:
            self.registers[index] = rank

    def merge(self, other: Sketch) -> None:
        """Becomes the union: the register-wise maximum."""
        self.registers[:] = bytes(map(max, self.registers, other.registers))

    def copy(self) -> Sketch:
        return Sketch(self.registers)

    def estimate(self) -> float:
        """Flajolet et al.'s estimator, with linear counting for small counts (a 64-bit hash needs no large-range
        correction)."""
        raw = _ALPHA * REGISTERS * REGISTERS / math.fsum(map(_INVERSE_POWERS.__getitem__, self.registers))
        empty = self.registers.count(0)
        if raw <= 2.5 * REGISTERS and empty:
            return REGISTERS * math.log(REGISTERS / empty)
        return raw


class Hasher:
    """64-bit keyed hashes of addresses: the same for every worker holding the same secret."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def __call__(self, address: str) -> int:
        digest = hashlib.blake2b(address.encode(), key=self._secret, digest_size=8).digest()
        return int.from_bytes(digest, "big")


def hour_of(now: float) -> int:
    return int(now // HOUR)


class Window:
    """Per key id, one sketch per clock hour of the window (`HOURS`); thread-safe."""

    def __init__(self, hours: int = HOURS) -> None:
        self.hours = hours
        self._lock = threading.Lock()
        self._buckets: dict[str, dict[int, Sketch]] = {}
        #: Per key id: the union of the window's past hours, computed once per current hour.
        self._past: dict[str, tuple[int, Sketch]] = {}

    def add(self, kid: str, hashes: Iterable[int], now: float) -> None:
        hour = hour_of(now)
        with self._lock:
            sketch = self._buckets.setdefault(kid, {}).setdefault(hour, Sketch())
            for hashed in hashes:
                sketch.add(hashed)
            past = self._past.get(kid)
            if past is not None and hour < past[0]:  # the clock went back: the cached union missed this hour
                del self._past[kid]

    def adopt(self, kid: str, hour: int, sketch: Sketch) -> None:
        """Merges an hour of another window in (a dead worker's file that had this worker's pid)."""
        with self._lock:
            kept = self._buckets.setdefault(kid, {}).get(hour)
            if kept is None:
                self._buckets[kid][hour] = sketch.copy()
            else:
                kept.merge(sketch)
            self._past.pop(kid, None)

    def snapshot(self, now: float) -> dict[str, tuple[Sketch, dict[int, Sketch]]]:
        """Per key id: the union over the window, and the hourly sketches (copies); drops the hours that left."""
        hour = hour_of(now)
        result = {}
        with self._lock:
            for kid in list(self._buckets):
                buckets = self._buckets[kid]
                for old in [h for h in buckets if h <= hour - self.hours]:
                    del buckets[old]
                if not buckets:
                    del self._buckets[kid]
                    self._past.pop(kid, None)
                    continue
                past = self._past.get(kid)
                if past is None or past[0] != hour:
                    past = (hour, union(sketch for h, sketch in buckets.items() if h < hour))
                    self._past[kid] = past
                whole = past[1].copy()
                if hour in buckets:
                    whole.merge(buckets[hour])
                result[kid] = (whole, {h: sketch.copy() for h, sketch in buckets.items()})
        return result

    def estimates(self, now: float) -> dict[str, float]:
        return {kid: whole.estimate() for kid, (whole, _) in self.snapshot(now).items()}


def union(sketches: Iterable[Sketch]) -> Sketch:
    result = Sketch()
    for sketch in sketches:
        result.merge(sketch)
    return result


def shared_secret(directory: str | None) -> bytes:
    """The hashing secret of every worker of this server: created once in the multiprocess directory (linked
    into place whole, so a worker reads either nothing or all of it); a random one without a directory."""
    if directory is None:
        return secrets.token_bytes(SECRET_BYTES)
    path = os.path.join(directory, SECRET_FILE)
    if not os.path.exists(path):
        temporary = os.path.join(directory, f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(descriptor, secrets.token_bytes(SECRET_BYTES))
        finally:
            os.close(descriptor)
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another worker was first: use its secret
        finally:
            os.unlink(temporary)
    with open(path, "rb") as file:
        secret = file.read()
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"{path} is not a {SECRET_BYTES}-byte secret")
    return secret


def file_name(pid: int) -> str:
    return f"tang_clients_{pid}.hll"


def save(directory: str, pid: int, window: Window, now: float) -> None:
    """Writes a worker's window (the union as of this hour and the hourly sketches), replacing the last."""
    parts: list[bytes | bytearray] = [_HEADER.pack(_MAGIC, PRECISION, hour_of(now))]
    for kid, (whole, buckets) in window.snapshot(now).items():
        encoded = kid.encode()
        parts += [_RECORD.pack(_UNION, hour_of(now), len(encoded)), encoded, whole.registers]
        for hour, sketch in buckets.items():
            parts += [_RECORD.pack(_BUCKET, hour, len(encoded)), encoded, sketch.registers]
    path = os.path.join(directory, file_name(pid))
    temporary = f"{path}.{secrets.token_hex(4)}.tmp"
    with open(temporary, "wb") as file:
        file.write(b"".join(parts))
    os.replace(temporary, path)


def load(path: str) -> tuple[int, dict[str, Sketch], dict[str, dict[int, Sketch]]]:
    """(hour written, union by key id as of that hour, hourly sketches by key id); ValueError if malformed."""
    with open(path, "rb") as file:
        data = file.read()
    if len(data) < _HEADER.size:
        raise ValueError(f"{path}: truncated")
    magic, precision, written = _HEADER.unpack_from(data)
    if magic != _MAGIC or precision != PRECISION:
        raise ValueError(f"{path}: not a sketch file of precision {PRECISION}")
    unions: dict[str, Sketch] = {}
    buckets: dict[str, dict[int, Sketch]] = {}
    offset = _HEADER.size
    while offset < len(data):
        if offset + _RECORD.size > len(data):
            raise ValueError(f"{path}: truncated")
        kind, hour, length = _RECORD.unpack_from(data, offset)
        offset += _RECORD.size
        kid = data[offset : offset + length].decode()
        registers = data[offset + length : offset + length + REGISTERS]
        offset += length + REGISTERS
        sketch = Sketch(registers)  # ValueError when truncated
        if kind == _UNION:
            unions[kid] = sketch
        else:
            buckets.setdefault(kid, {})[hour] = sketch
    return written, unions, buckets


def adopt(directory: str, pid: int, window: Window) -> None:
    """Takes over the file a dead worker with this pid left (a pid is reused): its clients still count."""
    path = os.path.join(directory, file_name(pid))
    try:
        _, _, buckets = load(path)
    except (OSError, ValueError):
        return
    for kid, hours in buckets.items():
        for hour, sketch in hours.items():
            window.adopt(kid, hour, sketch)


#: Per file name: (modification time, size, current hour) and the unions it gave, so that a dead worker's file
#: is merged from its hours once per hour, not at every scrape.
Cache = dict[str, tuple[tuple[int, int, int], dict[str, Sketch]]]


def gather(
    directory: str, now: float, alive: Callable[[int], bool], cache: Cache, hours: int = HOURS
) -> dict[str, Sketch]:
    """The union by key id of every worker's window (alive or not) as of `now`; removes files whose every hour
    has left the window when their worker is dead."""
    current = hour_of(now)
    merged: dict[str, Sketch] = {}
    seen = set()
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        found = _FILE.match(name)
        if not found:
            left = _TEMPORARY.match(name)  # a worker killed while writing
            if left and not alive(int(left.group(1))):
                with contextlib.suppress(OSError):
                    os.unlink(path)
            continue
        try:
            stat = os.stat(path)
        except OSError:
            continue
        signature = (stat.st_mtime_ns, stat.st_size, current)
        cached = cache.get(name)
        if cached is not None and cached[0] == signature:
            windows = cached[1]
        else:
            try:
                written, unions, buckets = load(path)
            except (OSError, ValueError):
                continue  # being replaced, or damaged: the worker's next flush rewrites it
            if written >= current:
                windows = unions
            else:  # a dead (or idle) worker's file from an earlier hour: only its hours still in the window
                windows = {}
                for kid, by_hour in buckets.items():
                    recent = [sketch for hour, sketch in by_hour.items() if hour > current - hours]
                    if recent:
                        windows[kid] = union(recent)
            cache[name] = (signature, windows)
        if not windows and not alive(int(found.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(path)
            cache.pop(name, None)
            continue
        seen.add(name)
        for kid, sketch in windows.items():
            kept = merged.get(kid)
            if kept is None:
                merged[kid] = sketch.copy()
            else:
                kept.merge(sketch)
    for name in cache.keys() - seen:
        del cache[name]
    return merged


def estimates(sketches: Mapping[str, Sketch]) -> dict[str, float]:
    return {kid: sketch.estimate() for kid, sketch in sketches.items()}
