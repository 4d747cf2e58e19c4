"""Loading keys: exchange keys validated (scalar range, point on the curve, scalar matching the point) and skipped
with a warning that shows no key material; exchange keys on other curves skipped; signing keys on P-256 and P-384
served; an unreadable key file keeps the last set serving; the advertisement's payload compact and sorted.

Whether a key is invalid is decided by `cryptography`, independently of the Rust code that loads it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tang_server.keys import b64, keyfiles
from tang_server.keys.keyset import load_keyset

from .listening import launched
from .oracles import jose_thumbprint
from .support import client_key, load_keys, reference_server, request, require_tools, serve_command, thumbprint
from .test_native import ORDER


def _int(value: str) -> int:
    return int.from_bytes(b64.decode(value), "big")


def _enc(value: int) -> str:
    return b64.encode(value.to_bytes(66, "big"))


def _scalar_out_of_range(key: dict[str, Any]) -> dict[str, Any]:
    return {**key, "d": _enc(_int(key["d"]) + ORDER)}  # the same scalar modulo n, but not in [1, n)


def _scalar_zero(key: dict[str, Any]) -> dict[str, Any]:
    return {**key, "d": _enc(0)}


def _point_off_curve(key: dict[str, Any]) -> dict[str, Any]:
    return {**key, "y": _enc(_int(key["y"]) ^ 1)}


def _scalar_of_another_key(key: dict[str, Any]) -> dict[str, Any]:
    return {**key, "d": keyfiles.generate_pair()[1]["d"]}


def _cryptography_accepts(key: dict[str, Any]) -> bool:
    """The oracle: a scalar in [1, n) (SEC 1's definition; cryptography before 43 reduces a larger one modulo n
    instead of refusing it, so the range is checked here) whose public point, by cryptography, is the key's (x, y)."""
    if not 1 <= _int(key["d"]) < ORDER:
        return False
    try:
        private = ec.derive_private_key(_int(key["d"]), ec.SECP521R1())
    except ValueError:
        return False
    public = private.public_key().public_numbers()
    return (public.x, public.y) == (_int(key["x"]), _int(key["y"]))


@pytest.mark.parametrize(
    "corrupt", [_scalar_out_of_range, _scalar_zero, _point_off_curve, _scalar_of_another_key], ids=lambda f: f.__name__
)
def test_invalid_exchange_key_is_skipped_with_a_warning_without_key_material(
    keys: Path, corrupt: Callable[[dict[str, Any]], dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    _, exchange = load_keys(keys)
    assert _cryptography_accepts(exchange)
    bad = corrupt(exchange)
    assert not _cryptography_accepts(bad)
    path = next(path for path in keys.glob("*.jwk") if "deriveKey" in path.read_text())
    os.chmod(path, 0o640)
    path.write_text(json.dumps(bad))
    with caplog.at_level(logging.WARNING):
        keyset = load_keyset(keys)
    assert [key.kind.value for key in keyset.keys] == ["signing"]  # the exchange key is not served at all
    assert keyset.find(thumbprint(exchange)) is None
    assert not keyset.ready
    warnings = [record.getMessage() for record in caplog.records if path.name in record.getMessage()]
    assert len(warnings) == 1 and "invalid exchange key" in warnings[0]
    text = caplog.text
    for member in ("d", "x", "y"):
        assert bad[member][:16] not in text
        if _int(bad[member]) < 2**128:
            continue  # too short to be recognised in a text (the zero scalar)
        assert str(_int(bad[member]))[:20] not in text and f"{_int(bad[member]):x}"[:20] not in text


def _ec_key(curve: ec.EllipticCurve, crv: str, size: int, **members: Any) -> dict[str, Any]:
    numbers = ec.generate_private_key(curve).private_numbers()
    return {"kty": "EC", "crv": crv,
            "x": b64.encode(numbers.public_numbers.x.to_bytes(size, "big")),
            "y": b64.encode(numbers.public_numbers.y.to_bytes(size, "big")),
            "d": b64.encode(numbers.private_value.to_bytes(size, "big")), **members}  # fmt: skip


def test_exchange_key_on_another_curve_is_skipped(keys: Path, caplog: pytest.LogCaptureFixture) -> None:
    p384 = _ec_key(ec.SECP384R1(), "P-384", 48, alg="ECMR", key_ops=["deriveKey"])
    keyfiles.write_key(keys, "p384.jwk", p384)
    with caplog.at_level(logging.WARNING):
        keyset = load_keyset(keys)
    assert keyset.find(thumbprint(p384)) is None
    assert keyset.ready  # the P-521 pair is untouched
    assert "p384.jwk: exchange keys must be on P-521" in caplog.text
    assert p384["d"][:16] not in caplog.text


@pytest.mark.parametrize(("curve", "crv", "size", "alg"),
                         [(ec.SECP256R1(), "P-256", 32, "ES256"), (ec.SECP384R1(), "P-384", 48, "ES384")])  # fmt: skip
def test_signing_keys_on_p256_and_p384_sign_the_advertisement(
    tmp_path: Path, curve: ec.EllipticCurve, crv: str, size: int, alg: str
) -> None:
    """jose verifies the advertisement with the advertised P-256 or P-384 key; clevis would accept it."""
    require_tools("jose")
    keys = tmp_path / "keys"
    keys.mkdir()
    _, exchange = keyfiles.generate_pair()
    keyfiles.write_key(keys, "exchange.jwk", exchange)
    signing = _ec_key(curve, crv, size, alg=alg, key_ops=["sign", "verify"])
    keyfiles.write_key(keys, "signing.jwk", signing)
    advertisement = load_keyset(keys).default_advertisement
    assert advertisement is not None
    (tmp_path / "adv.jws").write_bytes(advertisement)
    public = {k: v for k, v in signing.items() if k != "d"}
    (tmp_path / "sig.jwk").write_text(json.dumps(public))
    verified = subprocess.run(["jose", "jws", "ver", "-i", str(tmp_path / "adv.jws"), "-k", str(tmp_path / "sig.jwk")],
                              capture_output=True, timeout=30)  # fmt: skip
    assert verified.returncode == 0, verified.stderr
    header = json.loads(b64.decode(json.loads(advertisement)["protected"]))
    assert header["alg"] == alg


_WITHOUT_DAC_BYPASS = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all"]


def _advertised_kids(port: int) -> set[str]:
    response = request(port, "GET", "/adv")
    assert response.status == 200, response
    payload = json.loads(b64.decode(json.loads(response.body)["payload"]))
    return {jose_thumbprint(key) for key in payload["keys"]}


def test_an_unreadable_key_file_keeps_the_last_set_serving(keys: Path, tmp_path: Path) -> None:
    """Run as root without the capabilities that bypass permission bits (as in test_live_directory)."""
    require_tools("jose", "setpriv")
    _, exchange = load_keys(keys)
    new = tmp_path / "new"
    written = keyfiles.generate_keys(new)

    def command(port: int) -> list[str]:
        return [*_WITHOUT_DAC_BYPASS, *serve_command(keys, port, "--no-auto-keygen")]

    with launched(command, tmp_path / "log") as server:
        before = _advertised_kids(server.port)
        assert len(before) == 2
        for path in written:
            # Created unreadable (mode 0 from the start): written first and then chmod-ed, it would be readable
            # for a moment, and the watcher could load it then (seen beside busy loops).
            descriptor = os.open(keys / path.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o000)
            with os.fdopen(descriptor, "wb") as file:
                file.write(path.read_bytes())
        assert _advertised_kids(server.port) == before
        rec = request(server.port, "POST", f"/rec/{thumbprint(exchange)}", json.dumps(client_key()).encode())
        assert rec.status == 200
        ready = json.loads(request(server.port, "GET", "/readyz").body)
        assert "Permission denied" in (ready["directory_error"] or "")
        assert _advertised_kids(server.port) == before  # asked again: still the last set, error said once
        for path in written:
            os.chmod(keys / path.name, 0o440)
        assert len(_advertised_kids(server.port)) == 4  # readable: the new pair is served
        assert json.loads(request(server.port, "GET", "/readyz").body)["directory_error"] is None
        log = server.log_text()
    assert log.count("Permission denied") == 1


def test_advertisement_payload_is_compact_sorted_and_the_references_key_set(
    reference_keys: Path, tmp_path: Path
) -> None:
    require_tools("socat", "/usr/libexec/tangd")
    with launched(lambda port: serve_command(reference_keys, port, "--no-auto-keygen"), tmp_path / "ours") as ours:
        ours_payload = b64.decode(json.loads(request(ours.port, "GET", "/adv").body)["payload"])
    with reference_server(reference_keys, tmp_path / "reference") as reference:
        reference_payload = b64.decode(json.loads(request(reference.port, "GET", "/adv").body)["payload"])
    parsed = json.loads(ours_payload)
    assert ours_payload == json.dumps(parsed, sort_keys=True, separators=(",", ":")).encode()

    def canonical(payload: bytes) -> list[str]:
        return sorted(json.dumps(key, sort_keys=True) for key in json.loads(payload)["keys"])

    assert canonical(ours_payload) == canonical(reference_payload)
    assert set(json.loads(reference_payload)) == set(parsed) == {"keys"}
