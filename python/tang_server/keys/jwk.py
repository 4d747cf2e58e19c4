"""JWK facts the protocol depends on: thumbprints, permitted operations, the public form."""

from __future__ import annotations

import json
import sys

from tang_server.keys import b64

TYPE_CHECKING = False  # as typing.TYPE_CHECKING, for mypy: typing costs `tangd` an import it need not pay
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any

    JWK = Mapping[str, Any]

#: Thumbprint hashes a client may use in a key id, by name, with the hashlib name and encoded length.
THUMBPRINT_HASHES: Mapping[str, str] = {
    "S1": "sha1",
    "S224": "sha224",
    "S256": "sha256",
    "S384": "sha384",
    "S512": "sha512",
}

#: The members RFC 7638 hashes for an EC key.
_EC_THUMBPRINT_MEMBERS = ("crv", "kty", "x", "y")

#: Private members of an EC JWK and the private operations, stripped from the advertised form.
_PRIVATE_MEMBERS = frozenset({"d"})
_PRIVATE_OPS = frozenset({"sign", "decrypt", "unwrapKey"})

#: The interpreter's built-in module for each hash (Python 3.12 merged _sha256 and _sha512 into _sha2).
_BUILTIN_HASHES = {
    "sha1": "_sha1",
    "sha224": "_sha2" if sys.version_info >= (3, 12) else "_sha256",
    "sha256": "_sha2" if sys.version_info >= (3, 12) else "_sha256",
    "sha384": "_sha2" if sys.version_info >= (3, 12) else "_sha512",
    "sha512": "_sha2" if sys.version_info >= (3, 12) else "_sha512",
}
_hash_functions: dict[str, Callable[[bytes], Any]] = {}


def digest(name: str, data: bytes) -> bytes:
    """`hashlib.new(name, data).digest()`, by a built-in module when the interpreter has one: hashlib loads
    OpenSSL, which costs `tangd` more than all the hashing a connection does."""
    function = _hash_functions.get(name)
    if function is None:
        function = _hash_functions[name] = _hash_function(name)
    return bytes(function(data).digest())


def _hash_function(name: str) -> Callable[[bytes], Any]:
    try:
        return getattr(__import__(_BUILTIN_HASHES[name]), name)  # type: ignore[no-any-return]
    except (KeyError, ImportError, AttributeError):  # an interpreter built without it
        pass
    import hashlib

    return lambda data: hashlib.new(name, data)


def thumbprint_input(jwk: JWK) -> bytes:
    """The RFC 7638 hash input: required members only, sorted, compact."""
    members = {name: jwk[name] for name in _EC_THUMBPRINT_MEMBERS}
    return json.dumps(members, sort_keys=True, separators=(",", ":")).encode()


def thumbprint(jwk: JWK, hash_name: str = "S256") -> str:
    return b64.encode(digest(THUMBPRINT_HASHES[hash_name], thumbprint_input(jwk)))


def thumbprints(jwk: JWK) -> list[str]:
    """The key's thumbprint under every hash a client may use (S1 for old LUKS headers, S256 today...)."""
    data = thumbprint_input(jwk)
    return [b64.encode(digest(name, data)) for name in THUMBPRINT_HASHES.values()]


def permits(jwk: object, operation: str) -> bool:
    """Whether a JWK allows `operation`, as the reference server decides it.

    Measured against the reference: `key_ops` must be a list containing the operation; a key without
    `key_ops` is permitted nothing when it has `use` (whatever its value) and everything when it has neither.
    A non-string `use` next to `key_ops` makes the key unusable.
    """
    if not isinstance(jwk, dict):
        return True  # an array has no members: nothing restricts it (it fails the shape check later)
    if "use" in jwk and not isinstance(jwk["use"], str):
        return False
    if "key_ops" not in jwk:
        return "use" not in jwk
    ops = jwk["key_ops"]
    return isinstance(ops, list) and operation in ops


def without_private_members(jwk: JWK) -> dict[str, Any]:
    """The JWK without its private members (`key_ops` untouched: it says what the key is for)."""
    return {name: value for name, value in jwk.items() if name not in _PRIVATE_MEMBERS}


def public_form(jwk: JWK) -> dict[str, Any]:
    """The advertised form: private members removed, private operations removed from `key_ops`."""
    public = without_private_members(jwk)
    if isinstance(public.get("key_ops"), list):
        public["key_ops"] = [op for op in public["key_ops"] if op not in _PRIVATE_OPS]
    return public
