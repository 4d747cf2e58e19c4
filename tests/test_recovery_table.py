"""The `/rec` check table of the protocol document, row by row, against a live server and against the reference.

Each case names the body, which key id it is posted to and the status the protocol document gives. The same
cases run against the reference C server on the same key directory: where the two disagree, the reference wins.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tang_server import b64

from .support import (
    Server,
    client_key,
    load_keys,
    our_server,
    reference_server,
    request,
    require_tools,
    thumbprint,
)

UNKNOWN = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
P = "Af" + "_" * 86  # 0x01ff..ff = p: not a valid coordinate


def _body(**changes: Any) -> Callable[[dict[str, Any]], bytes]:
    def make(client: dict[str, Any]) -> bytes:
        document = {**client, **changes}
        return json.dumps({k: v for k, v in document.items() if v is not _DROP}).encode()

    return make


_DROP = object()


def _raw(text: str) -> Callable[[dict[str, Any]], bytes]:
    return lambda client: text.encode()


def _last_bit_flipped(name: str) -> Callable[[dict[str, Any]], bytes]:
    """(x, y) with y's lowest bit flipped: on the curve only if 2y +- 1 = 0 mod p, which a random point is not."""

    def make(client: dict[str, Any]) -> bytes:
        value = bytearray(b64.decode(client[name]))
        value[-1] ^= 1
        return json.dumps({**client, name: b64.encode(bytes(value))}).encode()

    return make


def _standard_alphabet(client: dict[str, Any]) -> bytes:
    """x in the standard base64 alphabet ('+' and '/'); a client whose x has neither '-' nor '_' is replaced."""
    while not {"-", "_"} & set(client["x"]):
        client = client_key()
    return json.dumps({**client, "x": client["x"].replace("-", "+").replace("_", "/")}).encode()


def _other_scalar() -> str:
    return str(client_key(private=True)["d"])


def _with_private(choose: Callable[[str], object]) -> Callable[[dict[str, Any]], bytes]:
    """The client's public key with a `d` member chosen from the client's real private scalar."""

    def make(client: dict[str, Any]) -> bytes:
        real = client_key(private=True)
        return json.dumps({**real, "d": choose(real["d"])}).encode()

    return make


def _trimmed(name: str) -> Callable[[dict[str, Any]], bytes]:
    """The coordinate without its leading zero bytes: the same number, shorter than the fixed width."""

    def make(client: dict[str, Any]) -> bytes:
        while b64.decode(client[name])[0] != 0:
            client = client_key()
        return json.dumps({**client, name: b64.encode(b64.decode(client[name]).lstrip(b"\0"))}).encode()

    return make


# (case id, body maker, key id: "exc", "sig" or "unknown", status from the protocol document)
CASES: list[tuple[str, Callable[[dict[str, Any]], bytes], str, int]] = [
    ("valid", _body(), "exc", 200),
    ("valid-no-alg", _body(alg=_DROP), "exc", 200),
    ("valid-with-key-ops", _body(key_ops=["deriveKey"]), "exc", 200),
    ("valid-with-private-d", _with_private(lambda d: d), "exc", 200),
    ("valid-short-x", _trimmed("x"), "exc", 200),
    ("valid-zero-padded-x", lambda c: json.dumps({**c, "x": "AAAA" + c["x"]}).encode(), "exc", 200),
    ("valid-trailing-whitespace", lambda c: json.dumps(c).encode() + b" \n\t\r\n", "exc", 200),
    (
        "valid-duplicate-member-last-wins",
        lambda c: json.dumps(c).encode().replace(b'"kty"', b'"kty":"oct","kty"'),
        "exc",
        200,
    ),
    ("1-not-json", _raw("not json"), "exc", 400),
    ("1-empty", _raw(""), "exc", 400),
    ("1-string", _raw('"x"'), "exc", 400),
    ("1-null", _raw("null"), "exc", 400),
    ("1-number", _raw("5"), "exc", 400),
    ("1-bom", lambda c: b"\xef\xbb\xbf" + json.dumps(c).encode(), "exc", 400),
    ("1-trailing-garbage", lambda c: json.dumps(c).encode() + b"x", "exc", 400),
    (
        "1-invalid-utf8",
        _raw('{"kty":"EC\udcff"}'.encode("utf-8", "surrogateescape").decode("latin-1")),
        "exc",
        400,
    ),
    ("1-before-404", _raw("not json"), "unknown", 400),
    ("2-key-ops-without-derive", _body(key_ops=["sign"]), "exc", 403),
    ("2-key-ops-empty", _body(key_ops=[]), "exc", 403),
    ("2-key-ops-not-list", _body(key_ops="deriveKey"), "exc", 403),
    ("2-key-ops-null", _body(key_ops=None), "exc", 403),
    ("2-use-without-key-ops", _body(use="enc"), "exc", 403),
    ("2-use-sig-without-key-ops", _body(use="sig"), "exc", 403),
    ("2-use-not-string", _body(use=5, key_ops=["deriveKey"]), "exc", 403),
    ("2-before-404", _body(key_ops=[]), "unknown", 403),
    ("2-use-ignored-with-key-ops", _body(use="sig", key_ops=["deriveKey"]), "exc", 200),
    ("3-array", _raw("[1, 2]"), "exc", 400),
    ("3-empty-array", _raw("[]"), "unknown", 400),
    ("3-no-kty", _body(kty=_DROP), "exc", 400),
    ("3-kty-not-string", _body(kty=1), "exc", 400),
    ("3-kty-null", _body(kty=None), "exc", 400),
    ("3-alg-not-string", _body(alg=5), "exc", 400),
    ("3-alg-null", _body(alg=None), "exc", 400),
    ("3-empty-object", _raw("{}"), "exc", 400),
    ("3-before-404", _body(kty=_DROP), "unknown", 400),
    ("4-kty-not-ec", _body(kty="RSA"), "exc", 400),
    ("4-before-404", _body(kty="oct"), "unknown", 400),
    ("5-alg-not-ecmr", _body(alg="ECDH-ES"), "exc", 400),
    ("5-before-404", _body(alg="ES512"), "unknown", 400),
    ("7-unknown-kid", _body(), "unknown", 404),
    ("8-signing-key", _body(), "sig", 403),
    ("8-signing-key-bad-point", _body(x="!!"), "sig", 403),
    ("9-no-crv", _body(crv=_DROP), "exc", 400),
    ("9-other-crv", _body(crv="P-384"), "exc", 400),
    ("9-no-x", _body(x=_DROP), "exc", 400),
    ("9-no-y", _body(y=_DROP), "exc", 400),
    ("9-x-not-string", _body(x=5), "exc", 400),
    ("9-padding", lambda c: json.dumps({**c, "x": c["x"] + "=="}).encode(), "exc", 400),
    (
        "9-plus-slash",
        _standard_alphabet,
        "exc",
        400,
    ),
    ("9-off-curve", _last_bit_flipped("y"), "exc", 400),
    ("9-x-is-p", _body(x=P), "exc", 400),
    ("9-infinity-zero", _body(x="A" * 88, y="A" * 88), "exc", 400),
    ("9-long-x", lambda c: json.dumps({**c, "x": "AQAA" + c["x"]}).encode(), "exc", 400),
    ("9-private-d-of-another-key", _with_private(lambda d: _other_scalar()), "exc", 400),
    ("9-private-d-zero", _with_private(lambda d: "AAAA"), "exc", 400),
    ("9-private-d-not-string", _with_private(lambda d: 5), "exc", 400),
    ("9-empty-x", _body(x=""), "exc", 400),
]


@pytest.fixture(scope="module")
def key_ids(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    from tang_server import keyfiles

    directory = tmp_path_factory.mktemp("table") / "keys"
    keyfiles.generate_keys(directory)
    signing, exchange = load_keys(directory)
    return directory, {"sig": thumbprint(signing), "exc": thumbprint(exchange), "unknown": UNKNOWN}


@pytest.fixture(scope="module")
def ours(key_ids: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with our_server(key_ids[0], tmp_path_factory.mktemp("ours") / "log", "--no-auto-keygen", workers=2) as server:
        yield server


@pytest.fixture(scope="module")
def reference(key_ids: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    require_tools("socat", "/usr/libexec/tangd")
    with reference_server(key_ids[0], tmp_path_factory.mktemp("ref") / "log") as server:
        yield server


@pytest.mark.parametrize(("body", "kid", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_our_status(
    ours: Server,
    key_ids: tuple[Path, dict[str, str]],
    body: Callable[[dict[str, Any]], bytes],
    kid: str,
    expected: int,
) -> None:
    response = request(ours.port, "POST", f"/rec/{key_ids[1][kid]}", body(client_key()))
    assert response.status == expected
    if expected != 200:
        assert response.body == b""
        assert response.headers["content-length"] == "0"


@pytest.mark.parametrize(("body", "kid", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_reference_agrees(
    reference: Server,
    key_ids: tuple[Path, dict[str, str]],
    body: Callable[[dict[str, Any]], bytes],
    kid: str,
    expected: int,
) -> None:
    """The expectations themselves, checked against the reference server: the table cannot drift from it."""
    assert request(reference.port, "POST", f"/rec/{key_ids[1][kid]}", body(client_key())).status == expected


def test_no_keys_is_500(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with our_server(empty, tmp_path / "log", "--no-auto-keygen") as server:
        assert request(server.port, "POST", f"/rec/{UNKNOWN}", json.dumps(client_key()).encode()).status == 500
        assert request(server.port, "POST", f"/rec/{UNKNOWN}", b"[]").status == 400
        assert request(server.port, "GET", "/adv").status == 500
        assert request(server.port, "GET", f"/adv/{UNKNOWN}").status == 404
