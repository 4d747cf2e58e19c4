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
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from . import b64, jwk
from .keyset import KEY_SUFFIX, load_keyset

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
    return write_new_file(directory, name, json.dumps(key, sort_keys=True, separators=(",", ":")).encode())


def write_new_file(directory: Path, name: str, data: bytes) -> Path:
    """Create `name` with `data`, mode 0440, atomically and durably; FileExistsError if it exists."""
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
    """Rename a key file without ever replacing another (hiding and un-hiding keys).

    A hard link then an unlink, because rename(2) would silently replace an existing key. A crash between the
    two leaves both names on the same file; running the operation again finishes the rename.
    """
    try:
        os.link(directory / source, directory / destination)
    except FileExistsError:
        if not os.path.samefile(directory / source, directory / destination):
            raise
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
    """`tangd-rotate-keys`: a fresh visible pair, then every previously visible key hidden. Never deletes.

    Killed at any instant, the directory keeps every key it had, byte for byte (visible or hidden), holds no
    half-written key, and always has a visible pair: the new pair is complete before any old key is hidden.
    """
    with directory_lock(directory):
        visible = [key.name for key in load_keyset(directory).keys if not key.hidden]
        written = generate_keys(directory)
        for name in visible:
            rename_key(directory, name, f".{name}")
        return written, visible


class RotationError(Exception):
    """A rotation step that does not apply to the directory as it is (said plainly to the operator)."""


#: Staged keys are hidden (the name starts with '.') and marked as not yet promoted.
STAGED_PREFIX = ".staged."


def stage(directory: Path) -> list[Path]:
    """Phase one for replicas: add a fresh pair as hidden keys, so every replica can answer for it first."""
    with directory_lock(directory):
        if staged_names(directory):
            raise RotationError("a staged pair exists already: promote it (or delete it) first")
        return [write_key(directory, STAGED_PREFIX + key_file_name(key), key) for key in generate_pair()]


#: Names the pair being promoted, so that a promotion interrupted half way can be finished by running it again.
#: It does not end in .jwk, so it is never loaded as a key.
PROMOTION_JOURNAL = ".promotion.json"


def promote(directory: Path) -> tuple[list[str], list[str]]:
    """Phase two: un-hide the staged pair, then hide every other visible key. Returns (promoted, hidden).

    Crash-safe like `rotate` (the staged pair becomes visible before the old one is hidden), and resumable: the
    pair is written to a journal first, so running `promote` again after a crash finishes the same promotion.
    """
    with directory_lock(directory):
        journal = directory / PROMOTION_JOURNAL
        if journal.exists():
            promoted = json.loads(journal.read_text())
        else:
            staged = staged_names(directory)
            if not staged:
                raise RotationError("no staged pair: run `rotate --stage` and wait for every replica first")
            promoted = [name.removeprefix(STAGED_PREFIX) for name in staged]
            write_new_file(directory, PROMOTION_JOURNAL, json.dumps(promoted).encode())
        for name in promoted:
            if (directory / (STAGED_PREFIX + name)).exists():
                rename_key(directory, STAGED_PREFIX + name, name)
        previous = [key.name for key in load_keyset(directory).keys if not key.hidden and key.name not in promoted]
        for name in previous:
            rename_key(directory, name, f".{name}")
        os.unlink(journal)
        fsync_directory(directory)
        return promoted, previous


def staged_names(directory: Path) -> list[str]:
    return sorted(key.name for key in load_keyset(directory).keys if key.name.startswith(STAGED_PREFIX))


def delete_hidden(directory: Path, key_ids: list[str] | None) -> list[tuple[str, str]]:
    """Delete hidden keys (all of them when `key_ids` is None), never visible or staged ones.

    Returns (S256 key id, file name) of each key removed. A key id that names no hidden key is an error, and
    nothing is deleted then.
    """
    with directory_lock(directory):
        keyset = load_keyset(directory)
        retired = [key for key in keyset.hidden if not key.name.startswith(STAGED_PREFIX)]
        if key_ids is None:
            chosen = retired
        else:
            chosen = []
            for kid in key_ids:
                key = keyset.find(kid)
                if key is None or key not in retired:
                    raise RotationError(f"{kid} is not a hidden (retired) key in {directory}")
                chosen.append(key)
        for key in chosen:
            os.unlink(directory / key.name)
        if chosen:
            fsync_directory(directory)
        return [(key.kid, key.name) for key in chosen]


def permission_problems(directory: Path) -> list[str]:
    """Key files readable or writable by other users, or a directory others may write to (say it, do not fix it:
    the operator's tooling owns the modes)."""
    problems: list[str] = []
    try:
        mode = directory.stat().st_mode
    except OSError:
        return problems
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        problems.append(f"{directory} is writable by other users: anyone could add or replace keys")
    for path in sorted(directory.iterdir()):
        if not path.name.endswith(KEY_SUFFIX):
            continue
        try:
            mode = path.stat().st_mode  # follows symlinks (Kubernetes Secret volumes)
        except OSError:
            continue
        if mode & (stat.S_IROTH | stat.S_IWOTH):
            problems.append(f"key file {path.name} is readable or writable by other users (mode {oct(mode & 0o777)})")
    return problems
