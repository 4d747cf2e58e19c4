"""Base64url without padding, strict on input as jose is: no padding, no '+' or '/', no whitespace."""

from __future__ import annotations

import binascii

# binascii directly, as the base64 module does: importing that module costs `tangd` more than all its base64 work.
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
_NOT_IN_ALPHABET = str.maketrans("", "", _ALPHABET)  # deletes the alphabet: what is left is not in it
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")


def encode(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).translate(_TO_URLSAFE).rstrip(b"=").decode("ascii")


def decode(text: str) -> bytes:
    """Decode unpadded base64url; raise ValueError on anything else."""
    if text.translate(_NOT_IN_ALPHABET) or len(text) % 4 == 1:
        raise ValueError("not unpadded base64url")
    try:
        return binascii.a2b_base64((text + "=" * (-len(text) % 4)).encode("ascii").translate(_FROM_URLSAFE))
    except binascii.Error as exc:  # pragma: no cover - the alphabet check above already rules this out
        raise ValueError("not unpadded base64url") from exc
