"""The `/rec` exchange, with the reference server's checks in the reference server's order.

A pure function of the key set, the key id and the request body, so the order of checks (which is observable:
a malformed body to an unknown key id is 400, not 404) is tested without a network.
"""

from __future__ import annotations

import json
from http import HTTPStatus

from tang_server._native import COORDINATE_LEN, ExchangeKey
from tang_server.errors import InvalidKey, InvalidPoint
from tang_server.keys import b64, jwk
from tang_server.keys.keyset import KeyKind, KeySet

_RESPONSE_PREFIX = b'{"alg":"ECMR","crv":"P-521","key_ops":["deriveKey"],"kty":"EC","x":"'
_RESPONSE_MIDDLE = b'","y":"'
_RESPONSE_SUFFIX = b'"}'


def recover(keyset: KeySet, thumbprint: str, body: bytes) -> tuple[HTTPStatus, bytes]:
    """Return the status and body of the answer to `POST /rec/{thumbprint}` with `body`."""
    try:
        request = json.loads(body.decode("utf-8"))  # strict UTF-8: a BOM is refused, as by the reference
    except (UnicodeDecodeError, ValueError, RecursionError):  # deep nesting: jansson refuses it too
        return HTTPStatus.BAD_REQUEST, b""
    if not isinstance(request, dict | list):
        return HTTPStatus.BAD_REQUEST, b""
    if not jwk.permits(request, "deriveKey"):
        return HTTPStatus.FORBIDDEN, b""
    if (
        not isinstance(request, dict)
        or not isinstance(request.get("kty"), str)
        or ("alg" in request and not isinstance(request["alg"], str))
    ):
        return HTTPStatus.BAD_REQUEST, b""
    if request["kty"] != "EC" or request.get("alg", "ECMR") != "ECMR":
        return HTTPStatus.BAD_REQUEST, b""
    if not keyset.keys:
        return HTTPStatus.INTERNAL_SERVER_ERROR, b""
    key = keyset.find(thumbprint)
    if key is None:
        return HTTPStatus.NOT_FOUND, b""
    if key.kind is not KeyKind.EXCHANGE or key.exchange is None:
        return HTTPStatus.FORBIDDEN, b""
    point = _client_point(request, key.jwk["crv"])
    if point is None:
        return HTTPStatus.BAD_REQUEST, b""
    try:
        if "d" in request:
            _check_private_member(request["d"], *point)
        x, y = key.exchange.exchange(*point)
    except (InvalidPoint, InvalidKey):
        return HTTPStatus.BAD_REQUEST, b""
    return HTTPStatus.OK, b"".join(
        (_RESPONSE_PREFIX, b64.encode(x).encode(), _RESPONSE_MIDDLE, b64.encode(y).encode(), _RESPONSE_SUFFIX)
    )


def _client_point(request: dict[str, object], curve: str) -> tuple[bytes, bytes] | None:
    """The client's (x, y) as fixed-width big-endian bytes, or None when absent or malformed."""
    x, y = request.get("x"), request.get("y")
    if request.get("crv") != curve:
        return None
    fixed_x, fixed_y = _fixed_width(x), _fixed_width(y)
    if fixed_x is None or fixed_y is None:
        return None
    return fixed_x, fixed_y


def _fixed_width(value: object) -> bytes | None:
    """A base64url big-endian integer as exactly 66 bytes.

    Like the reference (jose reads coordinates as integers of any length), a shorter or zero-padded longer
    encoding of the same number is accepted; the number itself is validated in Rust.
    """
    if not isinstance(value, str):
        return None
    try:
        number = b64.decode(value).lstrip(b"\0")
    except ValueError:
        return None
    if len(number) > COORDINATE_LEN:
        return None
    return number.rjust(COORDINATE_LEN, b"\0")


def _check_private_member(d: object, x: bytes, y: bytes) -> None:
    """A request carrying its private `d` is accepted only when `d` belongs to the point, as the reference does.

    Raises InvalidKey otherwise. The scalar goes into a Rust key that is wiped when dropped, here at once.
    """
    scalar = _fixed_width(d)
    if scalar is None:
        raise InvalidKey("private member is not a valid scalar")
    ExchangeKey(scalar, x, y)
