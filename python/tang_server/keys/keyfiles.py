"""Writing keys to a key directory: generation, atomic crash-safe writes, rotation.

The server itself never writes or deletes a key file except to generate a pair when no key is visible. Every key
file goes through `write_new_file`: created with mode 0440 from the first byte (CVE-2023-1672 was a window where the
reference's new keys were world-readable), written under a temporary name that is never loaded, fsynced, linked
into place without ever replacing an existing file, and the directory fsynced.

A command that changes several files (a pair written, old keys hidden, hidden keys deleted) cannot be atomic in a
plain directory. So each one first writes its whole plan, new keys included, to a journal (one file, itself
written atomically), then carries the plan out with steps that can each be repeated, then removes the journal.
Killed at any point, the directory holds either no journal and the complete result or the state before, or a
journal from which running the same command again finishes exactly that plan. Every command takes the directory
lock, and refuses to start while another command's plan is pending (it names the command that finishes it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from tang_server.keys import b64, jwk
from tang_server.keys.keyset import KEY_SUFFIX, KeyKind, load_keyset

logger = logging.getLogger(__name__)

KEY_FILE_MODE = 0o440
_COORDINATE_LEN = 66

#: The plan of the command under way. Not a .jwk name, so it is never loaded as a key; it holds the new keys'
#: private parts until they are written, with the key files' mode.
JOURNAL = ".tang-keys.journal"

#: Staged keys are hidden (the name starts with '.') and marked as not yet promoted.
STAGED_PREFIX = ".staged."

#: The journal's command for a generated pair: `keygen`, first-start and request-time generation alike.
KEYGEN = "keygen"

#: write_new_file's temporary names: left behind only by a crash, removed under the lock by the next command.
_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")


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


def key_file_bytes(key: Mapping[str, Any]) -> bytes:
    """A key file's exact content (compact, sorted: the same key always gives the same bytes)."""
    return json.dumps(key, sort_keys=True, separators=(",", ":")).encode()


def write_key(directory: Path, name: str, key: Mapping[str, Any]) -> Path:
    """Write one key file atomically and durably; never replaces an existing file (FileExistsError)."""
    return write_new_file(directory, name, key_file_bytes(key))


def write_new_file(directory: Path, name: str, data: bytes) -> Path:
    """Create `name` with `data`, mode 0440, atomically and durably; FileExistsError if it exists."""
    target = directory / name
    # The temporary name does not end in .jwk, so a crash leaves junk that is never loaded as a key.
    temporary = directory / f".{name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, KEY_FILE_MODE)
    try:
        os.fchmod(fd, KEY_FILE_MODE)  # the umask may have removed bits; never added any
        _inherit_owner(fd, directory)
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


def _inherit_owner(fd: int, directory: Path) -> None:
    """Give a file root writes into a service user's key directory to that user (and its group).

    An operator rotates as root in a directory the server reads as its own user (`tang` on Fedora, `_tang` on
    Debian; the reference's tangd-keygen chowns to it by name): a root-owned 0440 key would be unreadable by the
    server. Following the directory's owner serves every distribution's user name.
    """
    if os.geteuid() != 0:
        return
    owner = os.stat(directory)
    if (owner.st_uid, owner.st_gid) != (0, 0):
        os.fchown(fd, owner.st_uid, owner.st_gid)


def rename_key(directory: Path, source: str, destination: str) -> None:
    """Rename a key file without ever replacing another (hiding and un-hiding keys).

    A hard link then an unlink, because rename(2) would silently replace an existing key. A crash between the
    two leaves both names on the same file (loaded as one key, still visible); repeating it finishes the rename.
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
    """Serialize the key commands and key generation between processes (several workers may generate)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class RotationError(Exception):
    """A key command that does not apply to the directory as it is (said plainly to the operator)."""


class PendingCommand(RotationError):
    """Another key command was interrupted in this directory; it must be finished first."""

    def __init__(self, directory: Path, command: str) -> None:
        super().__init__(
            f"an interrupted `tang-server {command} {directory}` is pending in {directory}: run it again to finish"
        )
        self.command = command


@dataclass(frozen=True)
class Plan:
    """What one key command does, in order: write new key files, rename keys, delete keys."""

    #: The command line words between `tang-server` and the directory, to name it to the operator.
    command: str
    writes: tuple[tuple[str, Mapping[str, Any]], ...] = ()
    renames: tuple[tuple[str, str], ...] = ()
    #: (file name, S256 key id) of each key to delete.
    deletes: tuple[tuple[str, str], ...] = ()

    def encode(self) -> bytes:
        record = {"command": self.command, "write": self.writes, "rename": self.renames, "delete": self.deletes}
        return json.dumps(record, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> Plan:
        record = json.loads(data)
        return cls(
            command=record["command"],
            writes=tuple((name, key) for name, key in record["write"]),
            renames=tuple((source, destination) for source, destination in record["rename"]),
            deletes=tuple((name, kid) for name, kid in record["delete"]),
        )

    def paths(self, directory: Path) -> list[Path]:
        return [directory / name for name, _ in self.writes]


def pending_plan(directory: Path) -> Plan | None:
    """The plan of an interrupted command, if one is waiting to be finished."""
    try:
        data = (directory / JOURNAL).read_bytes()
    except FileNotFoundError:
        return None
    try:
        return Plan.decode(data)
    except (ValueError, KeyError, TypeError) as exc:  # written atomically: only a damaged disk gets here
        raise RotationError(f"{directory / JOURNAL} is unreadable ({type(exc).__name__}); inspect it") from exc


def _carry_out(directory: Path, command: str, make_plan: Callable[[], Plan | None]) -> Plan | None:
    """Under the lock: finish this command's interrupted plan, or journal a new one (None: nothing to do), then
    carry it out."""
    with directory_lock(directory):
        plan = pending_plan(directory)
        if plan is not None and plan.command != command:
            raise PendingCommand(directory, plan.command)  # before anything is written
        _remove_temporaries(directory)
        if plan is not None:
            logger.warning("finishing the interrupted `tang-server %s %s`", command, directory)
        else:
            plan = make_plan()
            if plan is None:
                return None
            write_new_file(directory, JOURNAL, plan.encode())
        _execute(directory, plan)
        return plan


def _execute(directory: Path, plan: Plan) -> None:
    """Every step may have been done already by an interrupted run: each checks before it acts."""
    for name, key in plan.writes:
        _write_once(directory, name, key)
    for source, destination in plan.renames:
        _rename_once(directory, source, destination)
    for name, _ in plan.deletes:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(directory / name)
    if plan.deletes:
        fsync_directory(directory)
    os.unlink(directory / JOURNAL)
    fsync_directory(directory)


def _write_once(directory: Path, name: str, key: Mapping[str, Any]) -> None:
    data = key_file_bytes(key)
    if not os.path.lexists(directory / name):
        write_new_file(directory, name, data)
    elif (directory / name).read_bytes() != data:
        raise RotationError(f"{directory / name} exists with other content than the interrupted command wrote")


def _rename_once(directory: Path, source: str, destination: str) -> None:
    if os.path.lexists(directory / source):
        rename_key(directory, source, destination)
    elif not os.path.lexists(directory / destination):
        raise RotationError(f"{directory / source} disappeared while the interrupted command renamed it")


def _remove_temporaries(directory: Path) -> None:
    """Temporary files of a writer killed before it linked or removed them (ours: only written under the lock)."""
    with os.scandir(directory) as entries:
        stale = sorted(entry.name for entry in entries if _TEMPORARY.fullmatch(entry.name))
    for name in stale:
        os.unlink(directory / name)
    if stale:
        fsync_directory(directory)


def _pair_plan(command: str, prefix: str = "") -> Plan:
    return Plan(command, writes=tuple((prefix + key_file_name(key), key) for key in generate_pair()))


def generate_keys(directory: Path) -> list[Path]:
    """`tang-server keygen`: write a fresh pair, named by S256 thumbprint; returns the paths written.

    Re-run after a crash, it finishes the interrupted pair instead of starting another.
    """
    directory.mkdir(parents=True, exist_ok=True)
    plan = _carry_out(directory, KEYGEN, lambda: _pair_plan(KEYGEN))
    assert plan is not None
    return plan.paths(directory)


def ensure_keys(directory: Path) -> list[Path]:
    """At start: `generate_if_needed`, except that a pending command is reported rather than raised."""
    try:
        return generate_if_needed(directory)
    except PendingCommand as exc:
        logger.warning("not generating keys: %s", exc)
        return []


def generation_pending(directory: Path) -> bool:
    """True when a pair generation was interrupted here (it may have left one key of the pair visible)."""
    try:
        plan = pending_plan(directory)
    except (OSError, RotationError):
        return False
    return plan is not None and plan.command == KEYGEN


def generate_if_needed(directory: Path) -> list[Path]:
    """The reference's behaviour on a directory without a visible key: generate a pair. Returns what it wrote.

    Checked again under the lock, so that of several workers finding no visible key, one writes a pair. An
    interrupted generation (`generation_pending`) is finished rather than doubled, visible keys or not; while
    another command is pending, PendingCommand.
    The directory must exist: a key directory that disappeared is an accident to report, not to paper over.
    """

    def plan() -> Plan | None:
        return None if any(not key.hidden for key in load_keyset(directory).keys) else _pair_plan(KEYGEN)

    done = _carry_out(directory, KEYGEN, plan)
    return [] if done is None else done.paths(directory)


def rotate(directory: Path) -> tuple[list[Path], list[str]]:
    """`tangd-rotate-keys`: a fresh visible pair, then every previously visible key hidden. Never deletes.

    The new pair is complete before any old key is hidden, so a visible pair exists at every instant.
    """

    def plan() -> Plan:
        visible = sorted({key.name for key in load_keyset(directory).keys if not key.hidden})
        return Plan("rotate", writes=_pair_plan("rotate").writes, renames=tuple((n, f".{n}") for n in visible))

    done = _carry_out(directory, "rotate", plan)
    assert done is not None
    return done.paths(directory), [source for source, _ in done.renames]


def stage(directory: Path) -> list[Path]:
    """Phase one for replicas: add a fresh pair as hidden keys, so every replica can answer for it first."""

    def plan() -> Plan:
        staged = staged_names(directory)
        if staged:
            pair = "a staged pair exists already" if _complete_pair(directory) else "an incomplete staged pair exists"
            raise RotationError(f"{pair} ({' '.join(staged)}): promote it, or delete it with `delete-hidden --kid`")
        return _pair_plan("rotate --stage", STAGED_PREFIX)

    done = _carry_out(directory, "rotate --stage", plan)
    assert done is not None
    return done.paths(directory)


def promote(directory: Path) -> tuple[list[str], list[str]]:
    """Phase two: un-hide the staged pair, then hide every other visible key. Returns (promoted, hidden).

    The staged pair becomes visible before the old one is hidden, so a visible pair exists at every instant.
    Only a complete pair (one signing and one exchange key) is promoted.
    """

    def plan() -> Plan:
        staged = staged_names(directory)
        if not staged:
            raise RotationError("no staged pair: run `rotate --stage` and wait for every replica first")
        if not _complete_pair(directory):
            raise RotationError(
                f"the staged keys ({' '.join(staged)}) are not one signing and one exchange key: delete them with "
                "`delete-hidden --kid=KID`, then run `rotate --stage` again"
            )
        visible = sorted({key.name for key in load_keyset(directory).keys if not key.hidden})
        unhide = tuple((name, name.removeprefix(STAGED_PREFIX)) for name in staged)
        return Plan("rotate --promote", renames=unhide + tuple((n, f".{n}") for n in visible))

    done = _carry_out(directory, "rotate --promote", plan)
    assert done is not None
    promoted = [destination for source, destination in done.renames if source.startswith(STAGED_PREFIX)]
    hidden = [source for source, _ in done.renames if not source.startswith(STAGED_PREFIX)]
    return promoted, hidden


def staged_names(directory: Path) -> list[str]:
    return sorted(key.name for key in load_keyset(directory).keys if key.name.startswith(STAGED_PREFIX))


def _complete_pair(directory: Path) -> bool:
    kinds = sorted(key.kind.value for key in load_keyset(directory).keys if key.name.startswith(STAGED_PREFIX))
    return kinds == sorted([KeyKind.SIGNING.value, KeyKind.EXCHANGE.value])


def delete_hidden(directory: Path, key_ids: list[str] | None) -> list[tuple[str, str]]:
    """Delete hidden keys (all of them when `key_ids` is None), never visible ones nor a complete staged pair.

    Returns (S256 key id, file name) of each key removed. A key id that names no hidden key is an error, and
    nothing is deleted then. A key of an incomplete staged pair (which promote refuses) may be named by its id.
    """
    command = "delete-hidden " + ("--all" if key_ids is None else " ".join(f"--kid={kid}" for kid in key_ids))

    def plan() -> Plan | None:
        keyset = load_keyset(directory)
        kept = _complete_pair(directory)
        deletable = [key for key in keyset.hidden if not (kept and key.name.startswith(STAGED_PREFIX))]
        if key_ids is None:
            chosen = [key for key in deletable if not key.name.startswith(STAGED_PREFIX)]
        else:
            chosen = []
            for kid in key_ids:
                key = keyset.find(kid)
                if key is None or key not in deletable:
                    raise RotationError(f"{kid} is not a hidden (retired) key in {directory}")
                chosen.append(key)
        unique = {key.name: key.kid for key in chosen}
        return Plan(command, deletes=tuple(sorted(unique.items()))) if unique else None

    done = _carry_out(directory, command, plan)
    return [] if done is None else [(kid, name) for name, kid in done.deletes]


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
