"""The Rust engine through its Python face, against `cryptography` as the independent oracle."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from tang_server._native import COORDINATE_LEN, ENGINE, ExchangeKey
from tang_server.errors import InvalidKey, InvalidPoint

# The order of P-521's base point (SEC 2), checked below against cryptography's own range check.
ORDER = int(
    "01FF" + "FFFFFFFF" * 7 + "FFFFFFFA" + "51868783BF2F966B7FCC0148F709A5D03BB5C9B8899C47AEBB6FB71E91386409",
    16,
)
PRIME = 2**521 - 1
scalars = st.integers(min_value=1, max_value=ORDER - 1)


def _bytes(value: int) -> bytes:
    return value.to_bytes(COORDINATE_LEN, "big")


def _point(scalar: int) -> tuple[bytes, bytes]:
    numbers = ec.derive_private_key(scalar, ec.SECP521R1()).public_key().public_numbers()
    return _bytes(numbers.x), _bytes(numbers.y)


def _key(scalar: int) -> ExchangeKey:
    return ExchangeKey(_bytes(scalar), *_point(scalar))


@settings(max_examples=60, deadline=None)
@given(server=scalars, client=scalars)
def test_exchange_is_scalar_multiplication(server: int, client: int) -> None:
    # S * (c * G) = (S * c mod n) * G, computed independently by cryptography.
    assert _key(server).exchange(*_point(client)) == _point(server * client % ORDER)


@settings(max_examples=20, deadline=None)
@given(server=scalars)
def test_exchange_of_generator_is_public_key(server: int) -> None:
    assert _key(server).exchange(*_point(1)) == _point(server)


def test_order_constant_is_the_curve_order() -> None:
    ec.derive_private_key(ORDER - 1, ec.SECP521R1())
    with pytest.raises(ValueError, match=r"Invalid EC key|point is at infinity"):  # the text varies by release
        ec.derive_private_key(ORDER, ec.SECP521R1())


@pytest.mark.parametrize(
    ("x", "y"),
    [
        (PRIME, 1),  # x = p
        (1, PRIME),  # y = p
        (PRIME + 1, 1),  # above p, still 66 bytes
        (2**528 - 1, 1),  # all ones
        (0, 0),  # the usual encoding of the point at infinity
        (0, 1),
        (1, 1),  # off the curve
    ],
)
def test_invalid_points_are_refused(x: int, y: int) -> None:
    with pytest.raises(InvalidPoint):
        _key(7).exchange(_bytes(x), _bytes(y))


def test_point_off_curve_by_one_bit() -> None:
    x, y = _point(12345)
    with pytest.raises(InvalidPoint):
        _key(7).exchange(x, y[:-1] + bytes([y[-1] ^ 1]))


@pytest.mark.parametrize("length", [0, 1, 65, 67, 132])
def test_wrong_lengths_are_refused(length: int) -> None:
    x, y = _point(3)
    with pytest.raises(ValueError, match="66 bytes"):
        _key(7).exchange(b"\1" * length, y)
    with pytest.raises(ValueError, match="66 bytes"):
        ExchangeKey(b"\1" * length, x, y)


@pytest.mark.parametrize("scalar", [0, ORDER, ORDER + 1, 2**528 - 1])
def test_invalid_scalars_are_refused(scalar: int) -> None:
    with pytest.raises(InvalidKey):
        ExchangeKey(_bytes(scalar), *_point(5))


def test_mismatched_key_is_refused() -> None:
    with pytest.raises(InvalidKey):
        ExchangeKey(_bytes(5), *_point(6))


def test_no_secret_in_repr_or_attributes() -> None:
    key = _key(0xDEADBEEF)
    assert repr(key) == "<ExchangeKey P-521>"
    assert [name for name in dir(key) if not name.startswith("_")] == ["exchange"]
    with pytest.raises(TypeError):
        _ = key.__reduce__()  # not picklable: the scalar cannot be serialised out of Rust


def test_engine_is_named() -> None:
    assert ENGINE == "aws-lc"
