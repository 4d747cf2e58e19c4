"""Property-based differential test of /rec: for generated bodies and key ids, our status equals the reference
server's on the same keys, and every success is byte for byte the reference's answer and `jose jwk exc`'s for
the posted point (whose x `cryptography`'s ECDH confirms). The reference is the oracle for the check order.

Coordinates are generated in every spelling the reference accepts for the same number: fixed width, trimmed
(leading zero bytes removed) and zero-padded (longer than the fixed width).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tang_server.keys import keyfiles

from .reference import Pair, jose_exchange, jose_thumbprint, pair
from .support import Response, client_key, load_keys, request

COORDINATE_BYTES = 66


def _with_leading_zeros() -> dict[str, Any]:
    """A client key whose x and y both start with a zero byte (a quarter of P-521 keys), so trimming shows."""
    while True:
        key = client_key(private=True)
        if all(base64.urlsafe_b64decode(key[m] + "==")[0] == 0 for m in ("x", "y")):
            return key


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def spellings(value: str) -> list[str]:
    """The same number: fixed width, trimmed, and padded by 3 and 6 zero bytes ('AAAA' keeps base64 aligned)."""
    raw = base64.urlsafe_b64decode(value + "==")
    return [value, _b64(raw.lstrip(b"\0")), "AAAA" + value, "AAAAAAAA" + value]


CLIENT = _with_leading_zeros()
OTHER = client_key()
TRIMMED = {spellings(CLIENT[m])[1] for m in ("x", "y")}
PADDED = {spellings(CLIENT[m])[2] for m in ("x", "y")} | {spellings(CLIENT[m])[3] for m in ("x", "y")}

names = st.sampled_from(["kty", "alg", "key_ops", "use", "crv", "x", "y", "d", "extra"])
values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-5, max_value=5),
    st.sampled_from(["EC", "RSA", "oct", "ECMR", "ES512", "P-521", "P-384", "enc", "sig", "", "deriveKey"]),
    st.sampled_from([CLIENT["x"], CLIENT["y"], CLIENT["d"], OTHER["x"], OTHER["y"], "AAAA", "A=", "+/"]),
    st.lists(st.sampled_from(["deriveKey", "sign", "verify", "encrypt", 5]), max_size=3),
)
objects = st.dictionaries(names, values, max_size=8)
# The client's own point in any spelling of each coordinate, then possibly a few members changed.
spelled = st.fixed_dictionaries({m: st.sampled_from(spellings(CLIENT[m])) for m in ("x", "y")})
# Mostly near-valid clevis bodies with some members changed, plus arbitrary objects, arrays and bytes.
near_valid = st.builds(
    lambda point, changes, drops: {
        **{k: v for k, v in {**CLIENT, **point}.items() if k != "d" and k not in drops},
        **changes,
    },
    spelled,
    st.dictionaries(names, values, max_size=2),
    st.sets(st.sampled_from(["alg", "crv", "kty", "x", "y"]), max_size=2),
)
bodies = st.one_of(
    near_valid.map(lambda o: json.dumps(o).encode()),
    objects.map(lambda o: json.dumps(o).encode()),
    st.lists(values, max_size=3).map(lambda a: json.dumps(a).encode()),
    st.binary(max_size=40),
)


@dataclass
class Servers:
    both: Pair
    kids: dict[str, str]  # computed by jose
    exchange: dict[str, Any]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    base = tmp_path_factory.mktemp("properties")
    keyfiles.generate_keys(base / "keys")
    signing, exchange = load_keys(base / "keys")
    kids = {
        "exchange": jose_thumbprint(exchange),
        "exchange-s1": jose_thumbprint(exchange, "S1"),
        "exchange-s512": jose_thumbprint(exchange, "S512"),
        "signing": jose_thumbprint(signing),
        "unknown": jose_thumbprint(OTHER),
    }
    with pair(base / "keys", base / "logs", "--no-auto-keygen") as both:
        yield Servers(both, kids, exchange)


def _number(value: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)), "big")


def expected_answer(exchange: dict[str, Any], body: bytes) -> bytes:
    """jose's answer for the point a successful body posted, written at fixed width; the answer's x checked
    against cryptography's ECDH with the same scalar."""
    posted = json.loads(body)  # duplicate members: the last one wins, in Python's json as in jansson
    x, y = (_number(posted[m]) for m in ("x", "y"))
    point = {
        "kty": "EC",
        "crv": "P-521",
        **{m: _b64(n.to_bytes(COORDINATE_BYTES, "big")) for m, n in (("x", x), ("y", y))},
    }
    answer = jose_exchange(exchange, point)
    scalar = ec.derive_private_key(_number(exchange["d"]), ec.SECP521R1())
    shared = scalar.exchange(ec.ECDH(), ec.EllipticCurvePublicNumbers(x, y, ec.SECP521R1()).public_key())
    assert _number(json.loads(answer)["x"]).to_bytes(COORDINATE_BYTES, "big") == shared
    return answer


def _check(servers: Servers, body: bytes, which: str) -> Response:
    target = f"/rec/{servers.kids[which]}"
    mine, theirs = (
        request(servers.both.ours.port, "POST", target, body),
        request(servers.both.reference.port, "POST", target, body),
    )
    assert mine.status == theirs.status, body
    if mine.status == 200:
        assert mine.body == theirs.body == expected_answer(servers.exchange, body), body
    return mine


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=bodies, which=st.sampled_from(["exchange", "exchange", "exchange-s1", "exchange-s512", "signing", "unknown"])
)
def test_rec_matches_the_reference(servers: Servers, body: bytes, which: str) -> None:
    _check(servers, body, which)


def test_generated_bodies_reach_every_outcome(servers: Servers) -> None:
    """The strategies are not all rejected at the first check: they produce each status of the table, and
    successes with trimmed and with padded coordinates."""
    seen: set[int | str] = set()

    @settings(max_examples=300, deadline=None, database=None, derandomize=True)  # the same bodies every run
    @given(body=bodies, which=st.sampled_from(list(servers.kids)))
    def collect(body: bytes, which: str) -> None:
        status = _check(servers, body, which).status
        seen.add(status)
        if status == 200:
            text = body.decode()
            seen.update(
                kind
                for kind, forms in (("trimmed", TRIMMED), ("padded", PADDED))
                if any(f'"{f}"' in text for f in forms)
            )

    collect()
    assert {200, 400, 403, 404, "trimmed", "padded"} <= seen
