"""Writing keys to a key directory: generation, atomic crash-safe writes, rotation.

The server itself never writes or deletes a key file except to generate a first pair on an empty directory.
Every write goes through `write_key`: created with mode 0440 from the first byte (CVE-2023-1672 was a window
where the reference's new keys were world-readable), written under a temporary name that is never loaded,
fsynced, linked into place without ever replacing an existing file, and the directory fsynced.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from . import b64, jwk
from .keyset import KEY_SUFFIX, KeyKind, KeySet, load_keyset

KEY_FILE_MODE = 0o440
_COORDINATE_LEN = 66


def generate_pair() -> tuple[dict[str, Any], dict[str, Any]]:
    """A fresh (signing, exchange) pair on P-521, in the form `jose jwk gen` and `tangd-keygen` write."""
    return _generate("ES512", ["sign", "verify"]), _generate("ECMR", ["deriveKey"])


def _generate(alg: str, key_ops: list[str]) -> dict[str, Any]:
    private = ec.generate_private_key(ec.SECP521R1())
    numbers = private.private_numbers()
    return {
        "alg": alg,
        "crv": "P-521",
        "d": b64.encode(numbers.private_value.to_bytes(_COORDINATE_LEN, "big")),
        "key_ops": key_ops,
        "kty": "EC",
        "x": b64.encode(numbers.public_numbers.x.to_bytes(_COORDINATE_LEN, "big")),
        "y": b64.encode(numbers.public_numbers.y.to_bytes(_COORDINATE_LEN, "big")),
    }


def key_file_name(key: Mapping[str, Any], *, hidden: bool = False) -> str:
    return f"{'.' if hidden else ''}{jwk.thumbprint(key)}{KEY_SUFFIX}"


def write_key(directory: Path, name: str, key: Mapping[str, Any]) -> Path:
    """Write one key file atomically and durably; never replaces an existing file (FileExistsError)."""
    data = json.dumps(key, sort_keys=True, separators=(",", ":")).encode()
    target = directory / name
    # The temporary name does not end in .jwk, so a crash leaves junk that is never loaded as a key.
    temporary = directory / f".{name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, KEY_FILE_MODE)
    try:
        os.fchmod(fd, KEY_FILE_MODE)  # the umask may have removed bits; never added any
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temporary, target)  # atomic, and unlike rename it refuses to replace an existing key
    finally:
        os.unlink(temporary)
    fsync_directory(directory)
    return target


def rename_key(directory: Path, source: str, destination: str) -> None:
    """Rename a key file without ever replacing another (hiding and un-hiding keys)."""
    os.link(directory / source, directory / destination)
    os.unlink(directory / source)
    fsync_directory(directory)


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def directory_lock(directory: Path) -> Iterator[None]:
    """Serialize key generation between processes (several workers may find an empty directory at once)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def generate_keys(directory: Path) -> list[Path]:
    """Write a fresh pair, named by S256 thumbprint; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    return [write_key(directory, key_file_name(key), key) for key in generate_pair()]


def ensure_keys(directory: Path) -> list[Path]:
    """The reference's behaviour on a directory without a visible key: generate a pair. Returns what it wrote.

    The directory must exist: a key directory that disappeared is an accident to report, not to paper over.
    """
    with directory_lock(directory):
        if any(not key.hidden for key in load_keyset(directory).keys):
            return []
        return generate_keys(directory)


def rotate(directory: Path) -> tuple[list[Path], list[str]]:
    """`tangd-rotate-keys`: hide every visible key and create a fresh pair. Never deletes anything.

    The new pair is written before any old key is hidden, so a crash at any point leaves at least every key
    that was there, and never a directory without a visible pair.
    """
    with directory_lock(directory):
        visible = [key.name for key in load_keyset(directory).keys if not key.hidden]
        written = generate_keys(directory)
        for name in visible:
            rename_key(directory, name, f".{name}")
        return written, visible


def signing_and_exchange(keyset: KeySet) -> tuple[int, int]:
    """How many visible signing and exchange keys a set has (for messages)."""
    visible = keyset.visible
    return (
        sum(key.kind is KeyKind.SIGNING for key in visible),
        sum(key.kind is KeyKind.EXCHANGE for key in visible),
    )
