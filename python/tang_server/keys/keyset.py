"""An immutable snapshot of a key directory, with everything a request needs prepared in advance.

Building a `KeySet` reads and parses the files, validates the exchange keys in Rust, computes the thumbprint
index and signs the advertisement once per signing key. Serving from it is dictionary lookups: a request never
reads a file, never signs and never builds JSON for `/adv`.

Secrets live in Rust only: an exchange key's scalar goes into its Rust `ExchangeKey`, a signing key's private
part signs while the set is built and is dropped with the build's locals. No object of a built set holds `d`.
"""

from __future__ import annotations

import enum
import errno
import json
import os

from tang_server._native import COORDINATE_LEN, ExchangeKey
from tang_server.errors import InvalidKey, InvalidPoint
from tang_server.keys import b64, jwk

# `tangd` loads a key set for every connection it serves itself: dataclasses, logging, pathlib, typing and hashlib
# would cost it more than the rest of the connection, so this module does without them at run time.
TYPE_CHECKING = False  # as typing.TYPE_CHECKING, for mypy
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from pathlib import Path
    from typing import Any, ClassVar

KEY_SUFFIX = ".jwk"

#: Signature algorithm by curve for signing keys (the protected header's `alg` follows the key's curve).
_SIGNING_ALGORITHMS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}


class KeyKind(enum.Enum):
    SIGNING = "signing"
    EXCHANGE = "exchange"


class _Record:
    """What `@dataclass(frozen=True, eq=False)` gave these classes: fields set once, a repr of the shown ones."""

    _shown: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **fields: object) -> None:
        self.__dict__.update(fields)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}")

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._shown)
        return f"{type(self).__name__}({shown})"


class Key(_Record):
    """One key file's key, without its private part (see the module's docstring)."""

    _shown = ("name", "hidden", "kind", "thumbprints")
    name: str
    hidden: bool
    kind: KeyKind
    #: The file's JSON object without its private member `d` (`key_ops` as in the file).
    jwk: Mapping[str, Any]
    thumbprints: tuple[str, ...]
    #: The Rust-held private scalar of a usable exchange key (None for signing keys and unusable ones).
    exchange: ExchangeKey | None
    #: A signing key's JWS signature (`protected`, `signature`) over `signed_payload`, made when its set was
    #: built. Kept because the private part is not: a later set with the same payload reuses it.
    signature: Mapping[str, str] | None
    signed_payload: bytes | None

    def __init__(
        self,
        name: str,
        hidden: bool,
        kind: KeyKind,
        jwk: Mapping[str, Any],
        thumbprints: tuple[str, ...],
        exchange: ExchangeKey | None = None,
        signature: Mapping[str, str] | None = None,
        signed_payload: bytes | None = None,
    ) -> None:
        super().__init__(
            name=name,
            hidden=hidden,
            kind=kind,
            jwk=jwk,
            thumbprints=thumbprints,
            exchange=exchange,
            signature=signature,
            signed_payload=signed_payload,
        )

    @property
    def kid(self) -> str:
        """The S256 thumbprint, as generated file names and `show-keys` use."""
        return self.thumbprints[2]

    def signed(self, signature: Mapping[str, str], payload: bytes) -> Key:
        """This key carrying `signature` over `payload`."""
        return Key(self.name, self.hidden, self.kind, self.jwk, self.thumbprints, self.exchange, signature, payload)


class KeySet(_Record):
    """Everything served for one state of the key directory."""

    _shown = ("keys", "by_thumbprint", "default_advertisement", "advertisements", "digest", "problems")
    keys: tuple[Key, ...]
    by_thumbprint: Mapping[str, Key]
    #: The default advertisement (`GET /adv`), or None when there is no visible signing key (answer 500).
    default_advertisement: bytes | None
    #: `GET /adv/{thp}` bodies for every signing key, visible or hidden, under all five thumbprints.
    advertisements: Mapping[str, bytes]
    #: Identifies exactly which keys are served and how (visible or hidden); equal across replicas in step.
    digest: str
    #: Human-readable reasons why this set cannot serve everything (logged, and shown by readiness).
    problems: tuple[str, ...]
    #: What the key files looked like when read (see `DirectoryScan`), to notice changes cheaply.
    fingerprint: tuple[tuple[str, int, int, int], ...]

    def __init__(
        self,
        keys: tuple[Key, ...],
        by_thumbprint: Mapping[str, Key],
        default_advertisement: bytes | None,
        advertisements: Mapping[str, bytes],
        digest: str,
        problems: tuple[str, ...] = (),
        fingerprint: tuple[tuple[str, int, int, int], ...] = (),
    ) -> None:
        super().__init__(
            keys=keys,
            by_thumbprint=by_thumbprint,
            default_advertisement=default_advertisement,
            advertisements=advertisements,
            digest=digest,
            problems=problems,
            fingerprint=fingerprint,
        )

    @classmethod
    def empty(cls) -> KeySet:
        return build_keyset(())

    def visibility(self) -> dict[str, str]:
        """By S256 key id, "visible" or "hidden", for every key of the set (metric labels, `/status`)."""
        return {key.kid: "hidden" if key.hidden else "visible" for key in self.keys}

    def find(self, thumbprint: str) -> Key | None:
        return self.by_thumbprint.get(thumbprint)

    @property
    def ready(self) -> bool:
        """Whether clients can bind and recover: a visible signing key and a visible usable exchange key."""
        return self.default_advertisement is not None and any(
            key.kind is KeyKind.EXCHANGE and key.exchange is not None for key in self.visible
        )

    @property
    def visible(self) -> tuple[Key, ...]:
        return tuple(key for key in self.keys if not key.hidden)

    @property
    def hidden(self) -> tuple[Key, ...]:
        return tuple(key for key in self.keys if key.hidden)


def load_keyset(directory: Path, previous: KeySet | None = None) -> KeySet:
    """Read a key directory into a key set.

    Raises OSError when the directory, or a key file in it, cannot be read: the caller keeps its last set
    rather than serving one with keys silently missing. A key file that is caught half written is skipped,
    except that a file which held a key in `previous` keeps that key (the same `Key` object) until it parses
    again: an accident in progress never changes what is served. Such a signing key can no longer sign, so
    when the advertisement changed meanwhile this raises OSError too, and the previous set keeps serving.
    """
    scan = scan_directory(directory)
    kept = [] if previous is None else [key for key in previous.keys if key.name in scan.unparsable]
    return build_keyset(sorted(scan.files.items()), fingerprint=scan.fingerprint, kept=kept)


class DirectoryScan(_Record):
    _shown = ("files", "unparsable", "fingerprint")
    #: The `*.jwk` files that parse as JSON objects, by name.
    files: Mapping[str, Mapping[str, Any]]
    #: `*.jwk` names present but not (yet) a readable JSON object: half written, or a dangling symlink.
    unparsable: frozenset[str]
    #: (name, inode, size, mtime) of every `*.jwk` file: changes whenever any of them does.
    fingerprint: tuple[tuple[str, int, int, int], ...]

    def __init__(
        self,
        files: Mapping[str, Mapping[str, Any]],
        unparsable: frozenset[str],
        fingerprint: tuple[tuple[str, int, int, int], ...],
    ) -> None:
        super().__init__(files=files, unparsable=unparsable, fingerprint=fingerprint)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DirectoryScan):
            return NotImplemented
        return (self.files, self.unparsable, self.fingerprint) == (other.files, other.unparsable, other.fingerprint)

    def __hash__(self) -> int:
        return hash((self.files, self.unparsable, self.fingerprint))


def scan_directory(directory: str | os.PathLike[str]) -> DirectoryScan:
    """Read every `*.jwk` file (following symlinks, as in a Kubernetes Secret volume); ignore other entries."""
    files: dict[str, Mapping[str, Any]] = {}
    unparsable: set[str] = set()
    fingerprint = []
    with os.scandir(directory) as entries:
        names = sorted(entry.name for entry in entries if entry.name.endswith(KEY_SUFFIX))
    for name in names:
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as file:
                status = os.fstat(file.fileno())
                data = file.read()
        except IsADirectoryError:
            continue
        except FileNotFoundError:
            if os.path.islink(path):
                # A dangling symlink: in a Kubernetes Secret volume, a key renamed by an update between the
                # kubelet's ..data swap and its new top-level links. Transient, not a deletion.
                unparsable.add(name)
            continue  # otherwise deleted since the listing: its deletion triggers another scan
        fingerprint.append((name, status.st_ino, status.st_size, status.st_mtime_ns))
        try:
            parsed = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            _warning("skipping key file %s: %s", path, _describe(exc))
            unparsable.add(name)
            continue
        if not isinstance(parsed, dict):
            _warning("skipping key file %s: not a JSON object", path)
            unparsable.add(name)
            continue
        files[name] = parsed
    return DirectoryScan(files, frozenset(unparsable), tuple(fingerprint))


def read_key_files(directory: Path) -> list[tuple[str, Mapping[str, Any]]]:
    """Every `*.jwk` file that parses as a JSON object, sorted by name."""
    return sorted(scan_directory(directory).files.items())


def _warning(message: str, *args: object) -> None:
    import logging  # here: a warning is rare, the import costs `tangd` a third of a connection

    logging.getLogger(__name__).warning(message, *args)


def _describe(exc: BaseException) -> str:
    # JSON errors quote a window of the document, which could be key material: keep only the position.
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON at line {exc.lineno} column {exc.colno}"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return type(exc).__name__


def build_keyset(
    files: Iterable[tuple[str, Mapping[str, Any]]],
    fingerprint: tuple[tuple[str, int, int, int], ...] = (),
    kept: Iterable[Key] = (),
) -> KeySet:
    """Build a set from parsed key files (`(name, JSON object)`) plus `kept` keys of an earlier set."""
    # Signing keys' private JWKs by file name: they sign below and are never stored in what is returned.
    private: dict[str, Mapping[str, Any]] = {}
    unsigned = list(kept)
    for name, data in files:
        key = _make_key(name, data)
        if key is not None:
            unsigned.append(key)
            if key.kind is KeyKind.SIGNING:
                private[name] = data
    unsigned.sort(key=lambda key: key.name)
    advertised = [key for key in unsigned if not key.hidden and key.kind is KeyKind.SIGNING]
    advertised += [key for key in unsigned if not key.hidden and key.kind is KeyKind.EXCHANGE]
    payload = _payload(advertised)
    keys = [_signed(key, payload, private.get(key.name)) for key in unsigned]

    problems: list[str] = []
    by_thumbprint: dict[str, Key] = {}
    for key in keys:
        for thp in key.thumbprints:
            by_thumbprint.setdefault(thp, key)
    visible_signing = [key for key in keys if key.kind is KeyKind.SIGNING and not key.hidden]
    visible_exchange = [key for key in keys if key.kind is KeyKind.EXCHANGE and not key.hidden]
    default = _serialize(payload, visible_signing)
    advertisements: dict[str, bytes] = {}
    for key in keys:
        if key.kind is KeyKind.SIGNING:
            # As the reference does: every visible signer plus the requested one (so a visible key signs twice).
            body = _serialize(payload, [*visible_signing, key])
            assert body is not None
            advertisements.update(dict.fromkeys(key.thumbprints, body))

    if not visible_signing:
        problems.append("no visible signing key: GET /adv answers 500")
    elif not visible_exchange:
        problems.append("no visible exchange key: clients cannot bind")
    return KeySet(
        keys=tuple(keys),
        by_thumbprint=by_thumbprint,
        default_advertisement=default,
        advertisements=advertisements,
        digest=keyset_digest(keys),
        problems=tuple(problems),
        fingerprint=fingerprint,
    )


def keyset_digest(keys: Iterable[Key]) -> str:
    """SHA-256 over the sorted (visibility, S256 thumbprint) pairs: stable across file names and load order."""
    lines = sorted(f"{'hidden' if key.hidden else 'visible'} {key.kid}\n" for key in keys)
    return jwk.digest("sha256", "".join(lines).encode()).hex()


def _make_key(name: str, data: Mapping[str, Any]) -> Key | None:
    hidden = name.startswith(".")
    if data.get("kty") != "EC" or not all(isinstance(data.get(m), str) for m in ("crv", "x", "y")):
        _warning("skipping key file %s: not an EC key with crv, x and y", name)
        return None
    thumbprints = tuple(jwk.thumbprints(data))
    if _is_exchange_key(data):
        exchange = _exchange_key(name, data)
        if exchange is None and "d" in data:
            return None  # invalid private key: reported, not served
        return Key(name, hidden, KeyKind.EXCHANGE, jwk.without_private_members(data), thumbprints, exchange)
    if jwk.permits(data, "sign") and jwk.permits(data, "verify"):
        if data["crv"] not in _SIGNING_ALGORITHMS or not isinstance(data.get("d"), str):
            _warning("skipping key file %s: signing key without a usable private key", name)
            return None
        return Key(name, hidden, KeyKind.SIGNING, jwk.without_private_members(data), thumbprints)
    _warning("skipping key file %s: neither a signing nor an exchange key", name)
    return None


def _is_exchange_key(data: Mapping[str, Any]) -> bool:
    ops = data.get("key_ops")
    return isinstance(ops, list) and "deriveKey" in ops


def _exchange_key(name: str, data: Mapping[str, Any]) -> ExchangeKey | None:
    """The Rust exchange key, or None when this key cannot answer recoveries (then `/rec` says 403)."""
    if data.get("alg", "ECMR") != "ECMR" or not isinstance(data.get("d"), str):
        return None
    if data["crv"] != "P-521":
        _warning("skipping key file %s: exchange keys must be on P-521", name)
        return None
    try:
        d, x, y = (b64.decode(data[m]) for m in ("d", "x", "y"))
        if not len(d) == len(x) == len(y) == COORDINATE_LEN:
            raise InvalidKey("coordinates are not 66 bytes")
        return ExchangeKey(d, x, y)
    except (ValueError, InvalidKey, InvalidPoint) as exc:
        _warning("skipping key file %s: invalid exchange key (%s)", name, type(exc).__name__)
        return None


def _payload(advertised: Iterable[Key]) -> bytes:
    keys = [jwk.public_form(key.jwk) for key in advertised]
    return json.dumps({"keys": keys}, sort_keys=True, separators=(",", ":")).encode()


def _signed(key: Key, payload: bytes, private: Mapping[str, Any] | None) -> Key:
    """A signing key with its signature over `payload`: made with `private`, or the one it carries already."""
    if key.kind is not KeyKind.SIGNING:
        return key
    if private is not None:
        return key.signed(_sign(private, payload), payload)
    if key.signed_payload == payload:
        return key  # kept from the previous set while its file is rewritten, and nothing it signs has changed
    raise OSError(
        errno.EAGAIN,
        f"signing key file {key.name} is being rewritten while the advertisement changes; retrying when complete",
    )


def _sign(private: Mapping[str, Any], payload: bytes) -> dict[str, str]:
    """One JWS signature (`protected` and `signature`, base64url) by a signing key's private JWK."""
    from jwcrypto import jwk as jwcrypto_jwk  # here: its import costs more than a whole `tangd` connection
    from jwcrypto import jws as jwcrypto_jws

    alg = _SIGNING_ALGORITHMS[private["crv"]]
    protected = json.dumps({"alg": alg, "cty": "jwk-set+json"}, separators=(",", ":"))
    token = jwcrypto_jws.JWS(payload)
    token.add_signature(jwcrypto_jwk.JWK(**private), alg=alg, protected=protected)
    flattened = json.loads(token.serialize())
    return {"protected": flattened["protected"], "signature": flattened["signature"]}


def _serialize(payload: bytes, signers: list[Key]) -> bytes | None:
    """Flattened JWS JSON for one signature, general JWS JSON for more, None for none."""
    if not signers:
        return None
    encoded = b64.encode(payload)
    signatures = [dict(key.signature or {}) for key in signers]
    if len(signatures) == 1:
        document: dict[str, Any] = {"payload": encoded, **signatures[0]}
    else:
        document = {"payload": encoded, "signatures": signatures}
    return json.dumps(document, separators=(",", ":")).encode()
