"""`tang-server check URL`: an end-to-end check of a Tang server, as a client would use it.

1. Fetch `/adv` and verify it: a JWS over a JWK set, signed by every advertised verify key (what clevis checks).
2. Bind: a fresh client key c, and the key the disk would be encrypted with, K = c * S (S: the server's exchange
   key from the advertisement).
3. Recover, exactly as clevis does at boot: a fresh ephemeral e, post X = C + E to `/rec/{kid}`, receive
   Y = S * X, and unblind K' = Y - e * S. The check passes when K' == K.

Useful to operators on its own, and run by the Helm chart's `helm test` against the Service.
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from jwcrypto import jwk as jwcrypto_jwk
from jwcrypto import jws as jwcrypto_jws

from tang_server._native import COORDINATE_LEN, ExchangeKey, add_points
from tang_server.keys import b64, jwk

_PRIME = 2**521 - 1


class CheckFailed(Exception):
    """The server does not behave as a Tang server must; the message says how."""


@dataclass
class CheckResult:
    signing_kids: list[str]
    exchange_kid: str
    checked: int


def _point(numbers: ec.EllipticCurvePublicNumbers) -> tuple[bytes, bytes]:
    return numbers.x.to_bytes(COORDINATE_LEN, "big"), numbers.y.to_bytes(COORDINATE_LEN, "big")


def _fresh() -> tuple[bytes, tuple[bytes, bytes]]:
    """A fresh scalar and its public point."""
    private = ec.generate_private_key(ec.SECP521R1())
    scalar = private.private_numbers().private_value.to_bytes(COORDINATE_LEN, "big")
    return scalar, _point(private.public_key().public_numbers())


def _get(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - an operator-given URL
        data: bytes = response.read()
    return data


def _post(url: str, body: bytes, timeout: float) -> bytes:
    request = urllib.request.Request(url, data=body, method="POST")  # noqa: S310
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        data: bytes = response.read()
    return data


def verified_keys(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The advertised keys, after checking that every advertised verify key signed the payload."""
    keys: list[dict[str, Any]] = json.loads(b64.decode(document["payload"]))["keys"]
    verifiers = [key for key in keys if "verify" in key.get("key_ops", [])]
    if not verifiers:
        raise CheckFailed("the advertisement has no verify key")
    for key in verifiers:
        token = jwcrypto_jws.JWS()
        token.deserialize(json.dumps(document))
        try:
            token.verify(jwcrypto_jwk.JWK(**key))
        except jwcrypto_jws.InvalidJWSSignature as exc:
            raise CheckFailed(f"advertisement not signed by advertised key {jwk.thumbprint(key)}") from exc
    return keys


def check(url: str, *, rounds: int = 1, timeout: float = 10.0) -> CheckResult:
    base = url.rstrip("/")
    try:
        document = json.loads(_get(f"{base}/adv", timeout))
    except (OSError, ValueError) as exc:
        raise CheckFailed(f"GET {base}/adv failed: {exc}") from exc
    keys = verified_keys(document)
    exchange = [key for key in keys if "deriveKey" in key.get("key_ops", [])]
    if not exchange:
        raise CheckFailed("the advertisement has no exchange (deriveKey) key: clients cannot bind")
    server = exchange[0]
    kid = jwk.thumbprint(server)
    server_point = (b64.decode(server["x"]), b64.decode(server["y"]))
    for _ in range(rounds):
        client_scalar, client_point = _fresh()
        bound = ExchangeKey(client_scalar, *client_point).exchange(*server_point)  # K = c * S
        ephemeral_scalar, ephemeral_point = _fresh()
        blinded = add_points(*client_point, *ephemeral_point)  # X = C + E
        body = json.dumps({"alg": "ECMR", "crv": "P-521", "kty": "EC",
                           "x": b64.encode(blinded[0]), "y": b64.encode(blinded[1])}).encode()  # fmt: skip
        try:
            answer = json.loads(_post(f"{base}/rec/{kid}", body, timeout))
        except (OSError, ValueError) as exc:
            raise CheckFailed(f"POST {base}/rec/{kid} failed: {exc}") from exc
        y_point = (b64.decode(answer["x"]), b64.decode(answer["y"]))
        ex, ey = ExchangeKey(ephemeral_scalar, *ephemeral_point).exchange(*server_point)  # e * S
        negated = (ex, (_PRIME - int.from_bytes(ey, "big")).to_bytes(COORDINATE_LEN, "big"))
        recovered = add_points(*y_point, *negated)  # K' = Y - e * S
        if recovered != bound:
            raise CheckFailed(f"recovery through /rec/{kid} gave the wrong key")
    signing = [jwk.thumbprint(key) for key in keys if "verify" in key.get("key_ops", [])]
    return CheckResult(signing, kid, rounds)
