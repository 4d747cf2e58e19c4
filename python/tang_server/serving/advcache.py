"""Advertisement signatures kept between `tangd` processes, so that one connection does not pay for signing.

A `KeySet` signs its advertisements when built, which needs jwcrypto: importing it costs more than the rest of a
connection. A JWS signature depends only on the signing key and the payload (the advertised public keys), so the
signatures made for one payload stay valid as long as the directory advertises the same keys. They are kept in
`RUNDIR/adv-H.json` (RUNDIR as in `handoff.py`; H: SHA-256 of the payload), written whole under a temporary name,
and used only when the file's payload is byte for byte the one built from the key files just read: a damaged or
forged file can at worst carry a signature that clients reject, never advertise another key. The directory must
be ours and closed to others (0700), else nothing is read or written there.
"""

from __future__ import annotations

import json
import os

from tang_server.keys.keyset import Key, KeyKind, KeySet, _make_key, _payload, build_keyset, scan_directory
from tang_server.serving import handoff


def load(directory: str) -> KeySet:
    """The directory's key set, built as `keyset.load_keyset` builds it, signing only what no cache file holds."""
    scan = scan_directory(directory)
    keys = sorted((key for name, data in scan.files.items() if (key := _make_key(name, data))), key=_name)
    advertised = [key for key in keys if not key.hidden and key.kind is KeyKind.SIGNING]
    advertised += [key for key in keys if not key.hidden and key.kind is KeyKind.EXCHANGE]
    payload = _payload(advertised)
    cache = _cache_file(payload)
    signatures = _read(cache, payload) if cache is not None else {}
    kept: list[Key] = []
    to_sign = []
    for key in keys:
        if key.kind is KeyKind.SIGNING and key.kid not in signatures:
            to_sign.append((key.name, scan.files[key.name]))
        elif key.kind is KeyKind.SIGNING:
            kept.append(key.signed(signatures[key.kid], payload))
        else:
            kept.append(key)
    keyset = build_keyset(to_sign, fingerprint=scan.fingerprint, kept=kept)
    if to_sign and cache is not None:
        made = {key.kid: dict(key.signature) for key in keyset.keys if key.signature is not None}
        _write(cache, payload, made)
    return keyset


def unchanged(directory: str, keyset: KeySet) -> bool:
    """True when the key files are the ones `keyset` was read from (names, inodes, sizes, times)."""
    found = []
    try:
        with os.scandir(directory) as entries:
            names = sorted(entry.name for entry in entries if entry.name.endswith(".jwk"))
        for name in names:
            status = os.stat(os.path.join(directory, name))
            found.append((name, status.st_ino, status.st_size, status.st_mtime_ns))
    except OSError:
        return False
    return tuple(found) == keyset.fingerprint


def _name(key: Key) -> str:
    return key.name


def _cache_file(payload: bytes) -> str | None:
    directory = handoff.server_runtime_directory()
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        status = os.stat(directory)
    except OSError:
        return None
    if status.st_uid != os.geteuid() or status.st_mode & 0o077:
        return None  # shared with others: neither trust nor feed it
    return f"{directory}/adv-{handoff._sha256_hex(payload)[:32]}.json"


def _read(cache: str, payload: bytes) -> dict[str, dict[str, str]]:
    try:
        with open(cache, "rb") as file:
            document = json.loads(file.read())
        if document["payload"] != payload.decode():
            return {}
        signatures = document["signatures"]
        return {
            str(kid): {"protected": str(value["protected"]), "signature": str(value["signature"])}
            for kid, value in signatures.items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _write(cache: str, payload: bytes, signatures: dict[str, dict[str, str]]) -> None:
    head, name = os.path.split(cache)
    temporary = os.path.join(head, f".{name}.{os.getpid()}")
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(json.dumps({"payload": payload.decode(), "signatures": signatures}))
        os.replace(temporary, cache)
    except OSError:  # not kept: the next connection signs again
        try:  # noqa: SIM105 - contextlib is an import `tangd` need not pay
            os.unlink(temporary)
        except OSError:
            pass
