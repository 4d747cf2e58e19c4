"""Secrets live in Rust only: no private scalar is reachable from the Python objects of a loaded key set.

The walk follows every reference the garbage collector knows about (dict, list and tuple contents, instance and
dataclass fields, bound methods, closures), starting at the live key set, and looks at every str, bytes and int
it meets for any form of a private key: the base64url `d`, its bytes, its integer, the key file's text.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tang_server.keys import b64, keyfiles
from tang_server.keys.keyset import KeyKind, KeySet, load_keyset
from tang_server.keys.keystore import KeyStore
from tang_server.keys.recovery import recover

from .support import client_key, reference_keygen, thumbprint

REPOSITORY = Path(__file__).resolve().parent.parent


@dataclass
class Secrets:
    """Every form in which a key directory's private keys could linger in Python."""

    texts: set[str] = field(default_factory=set)  # base64url `d` and the whole file text
    blobs: set[bytes] = field(default_factory=set)  # raw scalar, base64url as bytes, the file's bytes
    numbers: set[int] = field(default_factory=set)

    def add_directory(self, directory: Path) -> None:
        for path in directory.glob("*.jwk"):
            self.add_file(path.read_bytes())
        for path in directory.glob(".*.jwk"):
            self.add_file(path.read_bytes())

    def add_file(self, content: bytes) -> None:
        d = json.loads(content)["d"]
        scalar = b64.decode(d)
        self.texts |= {d, content.decode()}
        self.blobs |= {scalar, scalar.lstrip(b"\0"), d.encode(), content}
        self.numbers.add(int.from_bytes(scalar, "big"))

    def found_in(self, obj: object) -> bool:
        if isinstance(obj, str):
            return any(secret in obj for secret in self.texts)
        if isinstance(obj, bytes | bytearray):
            return any(secret in obj for secret in self.blobs)
        if isinstance(obj, int) and not isinstance(obj, bool):
            return obj in self.numbers
        return False


def reachable(root: object) -> Iterator[object]:
    """Every object reachable from `root`, stopping at types and modules (shared by everything, not owned)."""
    seen: dict[int, object] = {}  # keeps what was visited alive, so ids are not reused during the walk
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen[id(obj)] = obj
        yield obj
        if isinstance(obj, type | types.ModuleType):
            continue
        if isinstance(obj, types.FunctionType):
            # Its globals are its module's namespace; what a function keeps of its own is closures and defaults.
            stack.extend((obj.__closure__, obj.__defaults__, obj.__kwdefaults__))
            continue
        stack.extend(gc.get_referents(obj))


def findings(root: object, secrets: Secrets) -> list[str]:
    return [f"{type(obj).__name__} of length {len(repr(obj))}" for obj in reachable(root) if secrets.found_in(obj)]


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    """A visible pair and a hidden pair, made by the reference's tangd-keygen."""
    keys = tmp_path / "keys"
    reference_keygen(keys)
    reference_keygen(tmp_path / "hidden")
    for path in (tmp_path / "hidden").glob("*.jwk"):
        shutil.copyfile(path, keys / f".{path.name}")
    return keys


def _secrets(*directories: Path) -> Secrets:
    secrets = Secrets()
    for directory in directories:
        secrets.add_directory(directory)
    assert secrets.numbers, "no private key found: the check would be vacuous"
    return secrets


def _assert_serves(keyset: KeySet) -> None:
    """The set without its secrets still does its work: /adv for every signer, /rec for every exchange key."""
    assert keyset.ready and keyset.default_advertisement is not None
    for key in keyset.keys:
        assert "d" not in set(key.jwk)  # (member names only: a failure must not print the scalar)
        if key.kind is KeyKind.SIGNING:
            assert keyset.advertisements[key.kid]
        else:
            status, _ = recover(keyset, key.kid, json.dumps(client_key()).encode())
            assert status == 200


def test_the_walk_finds_a_planted_secret(directory: Path) -> None:
    """The check can fail: each form of a scalar, hidden in a closure, a field or a container, is found."""
    secrets = _secrets(directory)
    d = next(iter(s for s in secrets.texts if len(s) < 100))
    scalar = b64.decode(d)

    @dataclass(frozen=True)
    class Holder:
        value: object

    def closure(value: object) -> object:
        return lambda: value

    for form in (d, scalar, int.from_bytes(scalar, "big"), f'{{"d":"{d}"}}', d.encode()):
        assert findings(Holder((1, {"k": [closure(form)]})), secrets), form
        assert findings({"x": Holder(form)}, secrets), form
    assert not findings(Holder((1, {"k": [closure("public")]})), secrets)


def test_loaded_keyset_holds_no_private_scalar(directory: Path) -> None:
    keyset = load_keyset(directory)
    assert len(keyset.visible) == 2 and len(keyset.hidden) == 2
    assert findings(keyset, _secrets(directory)) == []
    _assert_serves(keyset)


def test_key_kept_through_a_half_written_file_holds_no_private_scalar(directory: Path) -> None:
    secrets = _secrets(directory)
    before = load_keyset(directory)
    for path in directory.glob("*.jwk"):  # both visible files caught in the middle of a rewrite
        content = path.read_bytes()
        path.write_bytes(content[: len(content) // 2])
    during = load_keyset(directory, previous=before)
    assert during.digest == before.digest
    assert during.default_advertisement == before.default_advertisement  # byte for byte, no re-signing needed
    assert during.advertisements == before.advertisements
    assert findings(during, secrets) == []
    _assert_serves(during)


def test_half_written_signing_key_keeps_the_previous_set_when_its_signature_would_change(
    directory: Path, tmp_path: Path
) -> None:
    """Its private part is gone, so it cannot sign a new advertisement: the whole previous set stays."""
    before = load_keyset(directory)
    signing = next(key for key in before.visible if key.kind is KeyKind.SIGNING)
    content = (directory / signing.name).read_bytes()
    (directory / signing.name).write_bytes(content[:10])
    reference_keygen(tmp_path / "more")
    extra = next(p for p in (tmp_path / "more").glob("*.jwk") if "deriveKey" in p.read_text())
    shutil.copyfile(extra, directory / extra.name)  # a new visible exchange key changes the payload
    with pytest.raises(OSError, match=signing.name):
        load_keyset(directory, previous=before)
    (directory / signing.name).write_bytes(content)  # the rewrite completes: the change takes effect
    after = load_keyset(directory, previous=before)
    assert after.digest != before.digest
    assert after.default_advertisement is not None
    payload = json.loads(b64.decode(json.loads(after.default_advertisement)["payload"]))
    assert thumbprint(json.loads(extra.read_text())) in {thumbprint(key) for key in payload["keys"]}


def test_hidden_signing_key_with_a_half_written_file_keeps_its_advertisement(directory: Path) -> None:
    before = load_keyset(directory)
    hidden = next(key for key in before.hidden if key.kind is KeyKind.SIGNING)
    (directory / hidden.name).write_bytes(b'{"kty":')
    during = load_keyset(directory, previous=before)
    new, old = (json.loads(keyset.advertisements[hidden.kid]) for keyset in (during, before))
    assert new["payload"] == old["payload"]
    assert new["signatures"][-1] == old["signatures"][-1]  # its signature, kept (visible keys sign afresh)


def test_live_key_store_holds_no_private_scalar(directory: Path, tmp_path: Path) -> None:
    store = KeyStore(directory, auto_keygen=False, recheck_seconds=3600)
    try:
        secrets = _secrets(directory)
        assert findings(store.keyset, secrets) == []
        assert findings(store, secrets) == []
        _assert_serves(store.keyset)
        # A rotation: the visible pair hidden, a new pair added; the new set is as clean as the first.
        for path in list(directory.glob("*.jwk")):
            path.rename(directory / f".{path.name}")
        reference_keygen(tmp_path / "new")
        for path in (tmp_path / "new").glob("*.jwk"):
            shutil.copyfile(path, directory / path.name)
        secrets.add_directory(tmp_path / "new")
        store.refresh()
        assert len(store.keyset.hidden) == 4
        assert findings(store, secrets) == []
        _assert_serves(store.keyset)
    finally:
        store.close()


_SERVER_WALK = """
import json, os, sys
from pathlib import Path
from tang_server.serving.server import build_application
from tang_server.settings import Settings
from tests.test_secrets import Secrets, findings
keys = Path(sys.argv[1])
app = build_application(Settings(keys_dir=keys, auto_keygen=False))
secrets = Secrets()
secrets.add_directory(keys)
assert app.store.keyset.ready
print(json.dumps({"keyset": findings(app.store.keyset, secrets), "application": findings(app, secrets)}))
"""


def test_application_state_holds_no_private_scalar(directory: Path, tmp_path: Path) -> None:
    """Through the application a server runs (in a child: the metrics module must not be imported here)."""
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics)}
    result = subprocess.run(
        [sys.executable, "-c", _SERVER_WALK, str(directory)],
        cwd=REPOSITORY,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.splitlines()[-1]) == {"keyset": [], "application": []}


def test_generated_keys_hold_no_private_scalar(tmp_path: Path) -> None:
    """Keys made by our own keygen (the first-start path) are loaded the same way."""
    keys = tmp_path / "keys"
    keyfiles.generate_keys(keys)
    keyset = load_keyset(keys)
    assert findings(keyset, _secrets(keys)) == []
    _assert_serves(keyset)
