"""The `/rec` check table of the protocol document, row by row, sent to our server and to the reference C tangd on
the same key directory: our answer must be the reference's.

Each case names the body, which key id it is posted to and the status the protocol document gives (checked
against the reference too, so the document cannot drift). Every 200 is compared byte for byte with the reference's
answer to the same request and with `jose jwk exc` for the client's point written plainly, so an unusual encoding
answered with the wrong point fails.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tang_server.keys import b64

from .reference import (
    HASHES,
    Pair,
    assert_same_answer,
    directory_without_keygen,
    http,
    jose_exchange,
    jose_thumbprint,
    pair,
    reference,
    reference_server_without_keygen,
    visible_and_hidden_pairs,
)
from .support import client_key, load_keys, our_server, parse_response, raw_request

UNKNOWN = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
P = "Af" + "_" * 86  # 0x01ff..ff = p: not a valid coordinate
#: Key id lengths per hash (protocol document, section 4).
KID_LENGTHS = {"S1": 27, "S224": 38, "S256": 43, "S384": 64, "S512": 86}

Client = dict[str, Any]  # a client key with its private `d`
_DROP = object()


def public(client: Client) -> Client:
    """What clevis posts: the public members only."""
    return {k: v for k, v in client.items() if k != "d"}


def _body(**changes: Any) -> Callable[[Client], bytes]:
    def make(client: Client) -> bytes:
        document = {**public(client), **changes}
        return json.dumps({k: v for k, v in document.items() if v is not _DROP}).encode()

    return make


def _raw(text: str) -> Callable[[Client], bytes]:
    return lambda client: text.encode()


def _encoded(**coordinates: Callable[[str], str]) -> Callable[[Client], bytes]:
    """The public key with some coordinates re-encoded (same number, other spelling)."""

    def make(client: Client) -> bytes:
        return json.dumps({**public(client), **{m: f(client[m]) for m, f in coordinates.items()}}).encode()

    return make


def _trim(value: str) -> str:
    """The coordinate without its leading zero bytes: the same number, shorter than the fixed width."""
    return b64.encode(b64.decode(value).lstrip(b"\0"))


def _pad(value: str) -> str:
    """Three more leading zero bytes ("AAAA" keeps the base64 aligned): the same number, longer."""
    return "AAAA" + value


def _last_bit_flipped(name: str) -> Callable[[Client], bytes]:
    """(x, y) with y's lowest bit flipped: on the curve only if 2y +- 1 = 0 mod p, which a random point is not."""

    def make(client: Client) -> bytes:
        value = bytearray(b64.decode(client[name]))
        value[-1] ^= 1
        return json.dumps({**public(client), name: b64.encode(bytes(value))}).encode()

    return make


def _standard_alphabet(client: Client) -> bytes:
    """x in the standard base64 alphabet ('+' and '/'); the case's client has '-' or '_' in x."""
    return json.dumps({**public(client), "x": client["x"].replace("-", "+").replace("_", "/")}).encode()


def _with_private(choose: Callable[[str], object]) -> Callable[[Client], bytes]:
    """The client's public key with a `d` member chosen from the client's real private scalar."""
    return lambda client: json.dumps({**public(client), "d": choose(client["d"])}).encode()


def _other_scalar() -> str:
    return str(client_key(private=True)["d"])


def _fresh() -> Client:
    return client_key(private=True)


def _leading_zero(*names: str) -> Callable[[], Client]:
    """A client whose coordinates all start with a zero byte (half of P-521 points each), so trimming shows."""

    def make() -> Client:
        while True:
            client = _fresh()
            if all(b64.decode(client[name])[0] == 0 for name in names):
                return client

    return make


def _url_safe_x() -> Client:
    while not {"-", "_"} & set((client := _fresh())["x"]):
        pass
    return client


@dataclass(frozen=True)
class Case:
    name: str
    body: Callable[[Client], bytes]
    kid: str  # "exc", "sig", "hidden_exc" or "unknown"
    status: int  # the protocol document's
    client: Callable[[], Client] = _fresh


CASES: list[Case] = [
    Case("valid", _body(), "exc", 200),
    Case("valid-hidden-key", _body(), "hidden_exc", 200),
    Case("valid-clevis-newline", lambda c: json.dumps(public(c)).encode() + b"\n", "exc", 200),
    Case("valid-no-alg", _body(alg=_DROP), "exc", 200),
    Case("valid-with-key-ops", _body(key_ops=["deriveKey"]), "exc", 200),
    Case("valid-with-private-d", _with_private(lambda d: d), "exc", 200),
    Case("valid-short-x", _encoded(x=_trim), "exc", 200, _leading_zero("x")),
    Case("valid-short-y", _encoded(y=_trim), "exc", 200, _leading_zero("y")),
    Case("valid-short-x-and-y", _encoded(x=_trim, y=_trim), "exc", 200, _leading_zero("x", "y")),
    Case("valid-zero-padded-x", _encoded(x=_pad), "exc", 200),
    Case("valid-zero-padded-y", _encoded(y=_pad), "exc", 200),
    Case("valid-short-x-padded-y", _encoded(x=_trim, y=_pad), "exc", 200, _leading_zero("x")),
    Case("valid-trailing-whitespace", lambda c: json.dumps(public(c)).encode() + b" \n\t\r\n", "exc", 200),
    Case(
        "valid-duplicate-member-last-wins",
        lambda c: json.dumps(public(c)).encode().replace(b'"kty"', b'"kty":"oct","kty"'),
        "exc",
        200,
    ),
    Case(
        "valid-duplicate-x-last-wins",
        lambda c: json.dumps(public(c)).encode().replace(b'"x"', b'"x":"%s","x"' % _fresh()["x"].encode()),
        "exc",
        200,
    ),
    Case("valid-use-with-key-ops", _body(use="enc", key_ops=["deriveKey"]), "exc", 200),
    Case("valid-use-sig-ignored-with-key-ops", _body(use="sig", key_ops=["deriveKey"]), "exc", 200),
    Case("1-not-json", _raw("not json"), "exc", 400),
    Case("1-empty", _raw(""), "exc", 400),
    Case("1-string", _raw('"x"'), "exc", 400),
    Case("1-null", _raw("null"), "exc", 400),
    Case("1-number", _raw("5"), "exc", 400),
    Case("1-bom", lambda c: b"\xef\xbb\xbf" + json.dumps(public(c)).encode(), "exc", 400),
    Case("1-trailing-garbage", lambda c: json.dumps(public(c)).encode() + b"x", "exc", 400),
    Case("1-invalid-utf8", lambda c: b'{"kty":"EC\xff"}', "exc", 400),
    Case("1-before-404", _raw("not json"), "unknown", 400),
    Case("2-key-ops-without-derive", _body(key_ops=["sign"]), "exc", 403),
    Case("2-key-ops-empty", _body(key_ops=[]), "exc", 403),
    Case("2-key-ops-not-list", _body(key_ops="deriveKey"), "exc", 403),
    Case("2-key-ops-null", _body(key_ops=None), "exc", 403),
    Case("2-use-without-key-ops", _body(use="enc"), "exc", 403),
    Case("2-use-sig-without-key-ops", _body(use="sig"), "exc", 403),
    Case("2-use-not-string", _body(use=5, key_ops=["deriveKey"]), "exc", 403),
    Case("2-before-404", _body(key_ops=[]), "unknown", 403),
    Case("3-array", _raw("[1, 2]"), "exc", 400),
    Case("3-empty-array", _raw("[]"), "unknown", 400),
    Case("3-no-kty", _body(kty=_DROP), "exc", 400),
    Case("3-kty-not-string", _body(kty=1), "exc", 400),
    Case("3-kty-null", _body(kty=None), "exc", 400),
    Case("3-alg-not-string", _body(alg=5), "exc", 400),
    Case("3-alg-null", _body(alg=None), "exc", 400),
    Case("3-empty-object", _raw("{}"), "exc", 400),
    Case("3-before-404", _body(kty=_DROP), "unknown", 400),
    Case("4-kty-not-ec", _body(kty="RSA"), "exc", 400),
    Case("4-before-404", _body(kty="oct"), "unknown", 400),
    Case("5-alg-not-ecmr", _body(alg="ECDH-ES"), "exc", 400),
    Case("5-before-404", _body(alg="ES512"), "unknown", 400),
    Case("7-unknown-kid", _body(), "unknown", 404),
    Case("8-signing-key", _body(), "sig", 403),
    Case("8-signing-key-bad-point", _body(x="!!"), "sig", 403),
    Case("9-no-crv", _body(crv=_DROP), "exc", 400),
    Case("9-other-crv", _body(crv="P-384"), "exc", 400),
    Case("9-no-x", _body(x=_DROP), "exc", 400),
    Case("9-no-y", _body(y=_DROP), "exc", 400),
    Case("9-x-not-string", _body(x=5), "exc", 400),
    Case("9-padding", _encoded(x=lambda x: x + "=="), "exc", 400),
    Case("9-plus-slash", _standard_alphabet, "exc", 400, _url_safe_x),
    Case("9-off-curve", _last_bit_flipped("y"), "exc", 400),
    Case("9-x-is-p", _body(x=P), "exc", 400),
    Case("9-infinity-zero", _body(x="A" * 88, y="A" * 88), "exc", 400),
    Case("9-long-x", _encoded(x=lambda x: "AQAA" + x), "exc", 400),
    Case(
        "9-duplicate-x-last-is-bad",
        lambda c: json.dumps(public(c)).encode().replace(b'"y"', b'"x":"!!","y"'),
        "exc",
        400,
    ),
    Case("9-private-d-of-another-key", _with_private(lambda d: _other_scalar()), "exc", 400),
    Case("9-private-d-zero", _with_private(lambda d: "AAAA"), "exc", 400),
    Case("9-private-d-not-string", _with_private(lambda d: 5), "exc", 400),
    Case("9-empty-x", _body(x=""), "exc", 400),
]


@dataclass
class Table:
    servers: Pair
    kids: dict[str, str]  # by role, computed by jose
    exchange: dict[str, dict[str, Any]]  # by role


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Table]:
    """A visible pair and a hidden pair, served by ours (two workers) and by the reference."""
    base = tmp_path_factory.mktemp("table")
    visible_and_hidden_pairs(base)
    signing, exchange = load_keys(base / "visible")
    _, hidden_exchange = load_keys(base / "hidden")
    kids = {"sig": jose_thumbprint(signing), "exc": jose_thumbprint(exchange), "unknown": UNKNOWN,
            "hidden_exc": jose_thumbprint(hidden_exchange)}  # fmt: skip
    with pair(base / "keys", base / "logs", "--no-auto-keygen", workers=2) as servers:
        yield Table(servers, kids, {"exc": exchange, "hidden_exc": hidden_exchange})


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_row_answers_as_the_reference(table: Table, case: Case) -> None:
    client = case.client()
    ours, theirs = table.servers.send(http("POST", f"/rec/{table.kids[case.kid]}", case.body(client)))
    assert_same_answer(ours, theirs, case.name)
    assert theirs.status == case.status, "the protocol document disagrees with the reference"
    if ours.status == 200:
        assert ours.headers["content-type"] == "application/jwk+json"
        # The client's point written plainly: what the encoding under test must mean.
        assert ours.body == theirs.body == jose_exchange(table.exchange[case.kid], public(client))


@pytest.mark.parametrize("hidden", [False, True], ids=["visible", "hidden"])
@pytest.mark.parametrize("hash_name", HASHES)
def test_key_id_of_every_hash_computed_by_jose(table: Table, hash_name: str, hidden: bool) -> None:
    """Key ids as jose computes them (`jose jwk thp -a`), not our `jwk.thumbprint`: both servers take each one and
    give the same answer, jose's."""
    key = table.exchange["hidden_exc" if hidden else "exc"]
    kid = jose_thumbprint(key, hash_name)
    assert len(kid) == KID_LENGTHS[hash_name]
    client = _fresh()
    ours, theirs = table.servers.send(http("POST", f"/rec/{kid}", json.dumps(public(client)).encode()))
    assert ours.status == theirs.status == 200
    assert ours.body == theirs.body == jose_exchange(key, public(client))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_no_keys_answers_as_the_reference(empty: Pair, case: Case) -> None:
    """No usable key (check 6): 500 for every body that passes checks 1 to 5, as the reference answers when it
    has no key and cannot create one; bodies refused by checks 1 to 5 get the same 400 or 403 first."""
    ours, theirs = empty.send(http("POST", f"/rec/{UNKNOWN}", case.body(case.client())))
    assert_same_answer(ours, theirs, case.name)
    assert theirs.status == (case.status if case.name[0] in "12345" else 500)


def test_no_keys_advertisement(empty: Pair) -> None:
    """`/adv` is 500 on both. `/adv/{unknown}` is a deliberate difference: the reference, failing to create the
    pair it wants, answers 500 to every request; ours (with --no-auto-keygen, which the reference does not have)
    answers from the keys it has, and an unknown key id is 404 as in any other key set."""
    ours, theirs = empty.send(http("GET", "/adv"))
    assert ours.status == theirs.status == 500
    ours, theirs = empty.send(http("GET", f"/adv/{UNKNOWN}"))
    assert (ours.status, theirs.status) == (404, 500)


@pytest.fixture(scope="module")
def empty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """An empty key directory: ours with `--no-auto-keygen`, the reference unable to write its own pair there."""
    logs = tmp_path_factory.mktemp("empty")
    with (
        directory_without_keygen({}) as directory,
        our_server(directory, logs / "ours.log", "--no-auto-keygen") as ours,
        reference_server_without_keygen(directory, logs / "reference.log") as theirs,
    ):
        yield Pair(ours, theirs)
        assert not list(directory.iterdir()), "a key was written"


def test_empty_directory_check_can_fail(tmp_path: Path) -> None:
    """The reference does write a pair when it can: the 500 above is the refused write, not an idle reference."""
    directory = tmp_path / "writable"
    directory.mkdir()
    with reference(directory, tmp_path / "reference.log") as theirs:
        response = parse_response(raw_request(theirs.port, http("GET", "/adv")))
    assert response.status == 200
    assert len(list(directory.glob("*.jwk"))) == 2
