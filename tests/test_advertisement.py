"""Advertisements from a live server, verified with independent code (cryptography, and jose's `jws ver`)."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from tang_server.keys import b64, keyfiles

from .reference import (
    directory_without_keygen,
    http,
    jose_exchange,
    jose_thumbprint,
    pair,
    reference,
    reference_server_without_keygen,
)
from .support import (
    Server,
    client_key,
    load_keys,
    our_server,
    request,
    require_tools,
    thumbprint,
)

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
    for index, keys in enumerate(pairs):
        for key in keys:
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


def _advertised(document: dict[str, Any]) -> list[str]:
    return sorted(json.dumps(key, sort_keys=True) for key in json.loads(b64.decode(document["payload"]))["keys"])


def test_advertisement_by_key_id_of_every_hash_as_the_reference(directory: dict[str, Any], tmp_path: Path) -> None:
    """Key ids computed by jose (`jose jwk thp -a`) for each hash, of a hidden and of a visible signing key: ours
    and the reference both answer with the same keys, signed by every visible signing key plus the one named."""
    visible = [keys[0] for keys in directory["visible"]]
    hidden = directory["hidden"][0]
    with pair(directory["path"], tmp_path / "logs") as both:
        default = json.loads(request(both.ours.port, "GET", "/adv").body)
        for key, hash_name in itertools.product([hidden, visible[0]], HASHES):
            target = f"/adv/{jose_thumbprint(key, hash_name)}"
            for server in (both.ours, both.reference):
                response = request(server.port, "GET", target)
                assert response.status == 200, (target, server.url)
                document = json.loads(response.body)
                assert _advertised(document) == _advertised(default)  # hidden keys never advertised
                assert sorted(signers(document, [*visible, hidden])) == sorted(thumbprint(k) for k in [*visible, key])
                if server is both.ours:  # ours signs the very payload of the default advertisement
                    assert document["payload"] == default["payload"]
            ours, theirs = both.send(http("GET", f"/adv/{jose_thumbprint(directory['hidden'][1], hash_name)}"))
            assert ours.status == theirs.status == 404  # an exchange key's id


def test_single_signer_is_flattened_and_thp_variant_is_general(keys: Path, tmp_path: Path) -> None:
    """As the reference: one signature is flattened; `/adv/{thp}` of the visible key is the visible signers plus
    the requested key, so the visible key signs twice, in the general serialization."""
    signing = next(json.loads(p.read_text()) for p in keys.glob("*.jwk") if "sign" in p.read_text())
    with pair(keys, tmp_path / "logs") as both:
        for server in (both.ours, both.reference):
            flat = json.loads(request(server.port, "GET", "/adv").body)
            by_thp = json.loads(request(server.port, "GET", f"/adv/{jose_thumbprint(signing, 'S1')}").body)
            assert set(flat) == {"payload", "protected", "signature"}, server.url
            assert signers(flat, [signing]) == [thumbprint(signing)]
            assert set(by_thp) == {"payload", "signatures"}, server.url
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


def _hide_all(keys: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    signing, exchange = load_keys(keys)
    for path in list(keys.glob("*.jwk")):
        path.rename(keys / f".{path.name}")
    return signing, exchange


def _visible_signing(directory: Path) -> dict[str, Any]:
    found: list[dict[str, Any]] = [json.loads(p.read_text()) for p in directory.glob("[!.]*.jwk")]
    (key,) = [k for k in found if "sign" in k["key_ops"]]
    return key


def _hidden_pair_works(server: Server, signing: dict[str, Any], exchange: dict[str, Any]) -> None:
    """The hidden pair still answers: its advertisement, and a recovery byte for byte as jose computes it."""
    assert request(server.port, "GET", f"/adv/{jose_thumbprint(signing)}").status == 200
    client = client_key()
    response = request(server.port, "POST", f"/rec/{jose_thumbprint(exchange)}", json.dumps(client).encode())
    assert (response.status, response.body) == (200, jose_exchange(exchange, client)), server.url


def test_only_hidden_keys_without_keygen_is_500_but_rec_works(keys: Path, tmp_path: Path) -> None:
    """Deliberate difference: with every key hidden and no key generation, `/adv` is 500 as with the reference,
    but the hidden pair keeps answering `/adv/{thp}` and `/rec`, so machines bound to it still unlock. The
    reference has no way to turn generation off; when it cannot write the pair it wants, it answers every request
    500, the hidden pair's recoveries included."""
    signing, exchange = _hide_all(keys)
    files = {path.name: path.read_bytes() for path in keys.iterdir()}
    with (
        directory_without_keygen(files) as directory,
        our_server(directory, tmp_path / "log", "--no-auto-keygen") as server,
        reference_server_without_keygen(directory, tmp_path / "reference.log") as theirs,
    ):
        assert request(server.port, "GET", "/adv").status == 500
        _hidden_pair_works(server, signing, exchange)
        assert "no visible signing key" in server.log_text()
        body = json.dumps(client_key()).encode()
        assert request(theirs.port, "GET", "/adv").status == 500
        assert request(theirs.port, "GET", f"/adv/{jose_thumbprint(signing)}").status == 500
        assert request(theirs.port, "POST", f"/rec/{jose_thumbprint(exchange)}", body).status == 500
        assert sorted(p.name for p in directory.iterdir()) == sorted(files)  # neither wrote a key


def test_only_hidden_keys_with_keygen_as_the_reference(keys: Path, tmp_path: Path) -> None:
    """With generation on (the default, and the reference's only way), both make a fresh visible pair at the
    first request and serve it, and the hidden pair keeps answering. Each server gets its own copy of the
    directory, since each writes its own pair."""
    signing, exchange = _hide_all(keys)
    copies = {name: tmp_path / name for name in ("ours", "reference")}
    for copy in copies.values():
        shutil.copytree(keys, copy)
    with (
        our_server(copies["ours"], tmp_path / "ours.log") as server,
        reference(copies["reference"], tmp_path / "reference.log") as theirs,
    ):
        for each in (server, theirs):
            document = json.loads(request(each.port, "GET", "/adv").body)
            new_signing = _visible_signing(copies["ours" if each is server else "reference"])
            assert signers(document, [new_signing, signing]) == [thumbprint(new_signing)]
            _hidden_pair_works(each, signing, exchange)


def test_only_signing_key_is_served_with_a_warning(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    signing, _ = keyfiles.generate_pair()
    keyfiles.write_key(keys_dir, keyfiles.key_file_name(signing), signing)
    with our_server(keys_dir, tmp_path / "log", "--no-auto-keygen") as server:
        assert request(server.port, "GET", "/adv").status == 200
        assert "no visible exchange key" in server.log_text()
