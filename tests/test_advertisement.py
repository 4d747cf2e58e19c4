"""Advertisements from a live server, verified with independent code (cryptography, and jose's `jws ver`)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from tang_server import b64, keyfiles

from .support import our_server, request, require_tools, thumbprint

HASHES = ["S1", "S224", "S256", "S384", "S512"]


def _public_key(jwk: dict[str, Any]) -> ec.EllipticCurvePublicKey:
    x, y = (int.from_bytes(b64.decode(jwk[m]), "big") for m in ("x", "y"))
    return ec.EllipticCurvePublicNumbers(x, y, ec.SECP521R1()).public_key()


def _signatures(document: dict[str, Any]) -> list[dict[str, str]]:
    if "signatures" in document:
        assert "signature" not in document and "protected" not in document
        return list(document["signatures"])
    return [{"protected": document["protected"], "signature": document["signature"]}]


def signers(document: dict[str, Any], candidates: list[dict[str, Any]]) -> list[str]:
    """S256 thumbprints of the candidates whose signature is on the document, one entry per signature."""
    found = []
    for signature in _signatures(document):
        assert json.loads(b64.decode(signature["protected"])) == {"alg": "ES512", "cty": "jwk-set+json"}
        raw = b64.decode(signature["signature"])
        assert len(raw) == 132
        der = encode_dss_signature(int.from_bytes(raw[:66], "big"), int.from_bytes(raw[66:], "big"))
        signing_input = f"{signature['protected']}.{document['payload']}".encode()
        matches = []
        for key in candidates:
            try:
                _public_key(key).verify(der, signing_input, ec.ECDSA(hashes.SHA512()))
                matches.append(thumbprint(key))
            except InvalidSignature:
                pass
        assert len(matches) == 1, "every signature is by exactly one known key"
        found.append(matches[0])
    return found


@pytest.fixture
def directory(tmp_path: Path) -> dict[str, Any]:
    """Two visible pairs and one hidden pair."""
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    pairs = [keyfiles.generate_pair() for _ in range(3)]
    for index, pair in enumerate(pairs):
        for key in pair:
            keyfiles.write_key(keys_dir, keyfiles.key_file_name(key, hidden=index == 2), key)
    return {"path": keys_dir, "visible": pairs[:2], "hidden": pairs[2]}


def test_default_advertisement_signed_by_every_visible_signing_key(directory: dict[str, Any], tmp_path: Path) -> None:
    visible_signing = [pair[0] for pair in directory["visible"]]
    all_signing = [*visible_signing, directory["hidden"][0]]
    with our_server(directory["path"], tmp_path / "log") as server:
        document = json.loads(request(server.port, "GET", "/adv").body)
    assert set(document) == {"payload", "signatures"}  # general serialization: two signatures
    assert sorted(signers(document, all_signing)) == sorted(thumbprint(k) for k in visible_signing)
    payload = json.loads(b64.decode(document["payload"]))
    advertised = {thumbprint(k): k for k in payload["keys"]}
    expected = {thumbprint(k): k for pair in directory["visible"] for k in pair}
    assert set(advertised) == set(expected)  # hidden keys never advertised
    for kid, key in advertised.items():
        assert "d" not in key
        assert key["key_ops"] == (["verify"] if "sign" in expected[kid]["key_ops"] else ["deriveKey"])
        assert {k: v for k, v in key.items() if k != "key_ops"} == {
            k: v for k, v in expected[kid].items() if k not in ("d", "key_ops")
        }


@pytest.mark.parametrize("hash_name", HASHES)
def test_advertisement_for_hidden_signing_key_adds_its_signature(
    directory: dict[str, Any], tmp_path: Path, hash_name: str
) -> None:
    hidden = directory["hidden"][0]
    all_signing = [pair[0] for pair in directory["visible"]] + [hidden]
    with our_server(directory["path"], tmp_path / "log") as server:
        response = request(server.port, "GET", f"/adv/{thumbprint(hidden, hash_name)}")
        default = json.loads(request(server.port, "GET", "/adv").body)
    assert response.status == 200
    document = json.loads(response.body)
    assert document["payload"] == default["payload"]  # same payload, one more signer
    assert sorted(signers(document, all_signing)) == sorted(thumbprint(k) for k in all_signing)


def test_single_signer_is_flattened_and_thp_variant_is_general(keys: Path, tmp_path: Path) -> None:
    signing = next(json.loads(p.read_text()) for p in keys.glob("*.jwk") if "sign" in p.read_text())
    with our_server(keys, tmp_path / "log") as server:
        flat = json.loads(request(server.port, "GET", "/adv").body)
        by_thp = json.loads(request(server.port, "GET", f"/adv/{thumbprint(signing, 'S1')}").body)
    assert set(flat) == {"payload", "protected", "signature"}
    assert signers(flat, [signing]) == [thumbprint(signing)]
    # As the reference: the visible signers plus the requested key, so a visible key signs twice.
    assert set(by_thp) == {"payload", "signatures"}
    assert signers(by_thp, [signing]) == [thumbprint(signing)] * 2


def test_jose_verifies_advertisement(keys: Path, tmp_path: Path) -> None:
    require_tools("jose")
    signing = next(p for p in keys.glob("*.jwk") if "sign" in p.read_text())
    with our_server(keys, tmp_path / "log") as server:
        body = request(server.port, "GET", "/adv").body
    (tmp_path / "adv.json").write_bytes(body)
    public = subprocess.run(["jose", "jwk", "pub", "-i", str(signing)], check=True, capture_output=True).stdout
    (tmp_path / "pub.jwk").write_bytes(public)
    verify = ["jose", "jws", "ver", "-i", str(tmp_path / "adv.json"), "-k", str(tmp_path / "pub.jwk"), "-a"]
    assert subprocess.run(verify, capture_output=True).returncode == 0
    other = tmp_path / "other"
    keyfiles.generate_keys(other)
    other_signing = next(p for p in other.glob("*.jwk") if "sign" in p.read_text())
    verify[5] = str(other_signing)
    assert subprocess.run(verify, capture_output=True).returncode != 0  # the check can fail


def test_only_hidden_keys_without_keygen_is_500_but_rec_works(keys: Path, tmp_path: Path) -> None:
    for path in list(keys.glob("*.jwk")):
        path.rename(keys / f".{path.name}")
    signing = next(json.loads(p.read_text()) for p in keys.glob(".*.jwk") if "sign" in p.read_text())
    with our_server(keys, tmp_path / "log", "--no-auto-keygen") as server:
        assert request(server.port, "GET", "/adv").status == 500
        assert request(server.port, "GET", f"/adv/{thumbprint(signing)}").status == 200
        assert "no visible signing key" in server.log_text()


def test_only_signing_key_is_served_with_a_warning(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    signing, _ = keyfiles.generate_pair()
    keyfiles.write_key(keys_dir, keyfiles.key_file_name(signing), signing)
    with our_server(keys_dir, tmp_path / "log", "--no-auto-keygen") as server:
        assert request(server.port, "GET", "/adv").status == 200
        assert "no visible exchange key" in server.log_text()
