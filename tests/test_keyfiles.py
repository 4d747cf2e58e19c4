"""Key files on disk: generation, atomic writes, rotation, and loading a directory into a key set."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from tang_server.keys import keyfiles
from tang_server.keys.keyset import KeyKind, load_keyset

from .support import BIN, our_server, require_tools, thumbprint


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keygen_writes_a_pair_named_by_thumbprint_with_mode_0440(tmp_path: Path) -> None:
    require_tools("jose")
    result = subprocess.run([str(BIN / "tang-server"), "keygen", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0
    paths = sorted(tmp_path.iterdir())
    assert len(paths) == 2
    algs = set()
    for path in paths:
        assert _mode(path) == 0o440
        key = json.loads(path.read_text())
        algs.add(key["alg"])
        jose_thp = subprocess.run(["jose", "jwk", "thp", "-i", str(path)], capture_output=True, text=True)
        assert path.name == f"{jose_thp.stdout.strip()}.jwk" == f"{thumbprint(key)}.jwk"
    assert algs == {"ES512", "ECMR"}
    assert sorted(result.stdout.split()) == sorted(str(p) for p in paths)


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_key_file_is_0440_from_the_first_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask: int) -> None:
    """The file is created with its final mode (never readable by others, even for an instant)."""
    created: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy(path: str, flags: int, mode: int = 0o777, *args: object, **kwargs: object) -> int:
        fd = real_open(path, flags, mode, *args, **kwargs)  # type: ignore[arg-type]
        if flags & os.O_CREAT:
            created.append((str(path), flags, stat.S_IMODE(os.fstat(fd).st_mode)))
        return fd

    monkeypatch.setattr(os, "open", spy)
    old = os.umask(umask)
    try:
        path = keyfiles.write_key(tmp_path, "k.jwk", keyfiles.generate_pair()[0])
    finally:
        os.umask(old)
    assert len(created) == 1
    _, flags, mode_at_creation = created[0]
    assert flags & os.O_EXCL and flags & os.O_NOFOLLOW
    assert mode_at_creation & 0o077 & ~0o040 == 0  # nothing for others, and no write for anyone
    assert _mode(path) == 0o440
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.jwk"]  # no temporary left behind


def test_write_never_replaces_an_existing_key(tmp_path: Path) -> None:
    first, second = keyfiles.generate_pair()
    path = keyfiles.write_key(tmp_path, "k.jwk", first)
    with pytest.raises(FileExistsError):
        keyfiles.write_key(tmp_path, "k.jwk", second)
    assert json.loads(path.read_text()) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.jwk"]


def test_rotate_hides_old_keys_and_adds_a_pair_without_deleting(keys: Path) -> None:
    before = {p.name: p.read_bytes() for p in keys.iterdir()}
    result = subprocess.run([str(BIN / "tang-server"), "rotate", str(keys)], capture_output=True, text=True)
    assert result.returncode == 0
    after = {p.name: p.read_bytes() for p in keys.iterdir()}
    for name, content in before.items():
        assert after[f".{name}"] == content
    new = [name for name in after if not name.startswith(".")]
    assert len(new) == 2 and not set(new) & set(before)
    keyset = load_keyset(keys)
    assert len(keyset.visible) == 2 and len(keyset.hidden) == 2
    assert "hidden" in result.stdout and "visible" in result.stdout


SERVICE_UID = 65534  # nobody: stands in for the service user (`tang`, `_tang`) that owns /var/db/tang


def test_keys_root_writes_belong_to_the_key_directorys_owner() -> None:
    """As root (how operators run rotations) into a directory the service user owns: every key file, visible and
    hidden, belongs to that user, and that user can read it (the kernel judges, through setpriv)."""
    assert os.geteuid() == 0, "the suite runs as root (make test installs Debian packages)"
    # Under /tmp, not tmp_path: pytest's directories are 0700 root, which the service user could not traverse.
    directory = Path(tempfile.mkdtemp(prefix="tang-owned-", dir="/tmp"))
    try:
        os.chown(directory, SERVICE_UID, SERVICE_UID)
        for command in (["keygen"], ["rotate", "--stage"], ["rotate", "--promote"]):
            subprocess.run([str(BIN / "tang-server"), *command, str(directory)], check=True, capture_output=True)
        files = sorted(directory.glob("*.jwk"))  # pathlib's * matches hidden names too
        assert len(files) == 4 and len([path for path in files if path.name.startswith(".")]) == 2
        for path in files:
            status = path.stat()
            assert (status.st_uid, status.st_gid, _mode(path)) == (SERVICE_UID, SERVICE_UID, 0o440), path
            as_service = ["setpriv", f"--reuid={SERVICE_UID}", f"--regid={SERVICE_UID}", "--clear-groups", "cat"]
            read = subprocess.run([*as_service, str(path)], capture_output=True)
            assert read.returncode == 0 and read.stdout == path.read_bytes(), read.stderr
    finally:
        shutil.rmtree(directory)


def test_keys_in_a_root_owned_directory_stay_root_owned() -> None:
    """The other side: a root-owned directory gets root-owned keys (nothing is handed to anyone else)."""
    directory = Path(tempfile.mkdtemp(prefix="tang-root-", dir="/tmp"))
    try:
        subprocess.run([str(BIN / "tang-server"), "keygen", str(directory)], check=True, capture_output=True)
        assert {(p.stat().st_uid, p.stat().st_gid) for p in directory.glob("*.jwk")} == {(0, 0)}
    finally:
        shutil.rmtree(directory)


def test_rotate_is_compatible_with_reference_layout(reference_keys: Path, tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    directory.mkdir()
    for path in reference_keys.iterdir():
        (directory / path.name).write_bytes(path.read_bytes())
    keyfiles.rotate(directory)
    assert len(load_keyset(directory).hidden) == 2


def test_loading_ignores_junk_and_skips_unparsable_keys(keys: Path, caplog: pytest.LogCaptureFixture) -> None:
    (keys / "lost+found").mkdir()
    (keys / "key_status.txt").write_text("not a key")
    (keys / "half.jwk").write_text('{"alg":"ES512","crv":"P-5')
    (keys / "array.jwk").write_text("[1]")
    (keys / "dir.jwk").mkdir()
    (keys / ".tmp.jwk.123.tmp").write_text("{}")
    with caplog.at_level(logging.WARNING):
        keyset = load_keyset(keys)
    assert len(keyset.keys) == 2
    assert "half.jwk" in caplog.text and "array.jwk" in caplog.text
    assert "key_status" not in caplog.text and '"alg"' not in caplog.text


def test_no_private_material_in_warnings(keys: Path, caplog: pytest.LogCaptureFixture) -> None:
    pair = keyfiles.generate_pair()
    broken = json.dumps(pair[1])[:-2]  # a key file caught half written
    (keys / "broken.jwk").write_text(broken)
    bad = dict(pair[1], d=pair[0]["d"])  # a private scalar that does not match the point
    (keys / "mismatch.jwk").write_text(json.dumps(bad))
    with caplog.at_level(logging.DEBUG):
        keyset = load_keyset(keys)
    assert len(keyset.keys) == 2
    for secret in (pair[0]["d"], pair[1]["d"]):
        assert secret not in caplog.text
        assert secret[:16] not in caplog.text


def test_kinds_visibility_and_thumbprint_index(keys: Path) -> None:
    signing_path = next(p for p in keys.iterdir() if "sign" in p.read_text())
    signing_path.rename(keys / f".{signing_path.name}")
    keyset = load_keyset(keys)
    kinds = {key.kind: key for key in keyset.keys}
    assert kinds[KeyKind.SIGNING].hidden and not kinds[KeyKind.EXCHANGE].hidden
    for key in keyset.keys:
        assert len(key.thumbprints) == 5
        assert [len(t) for t in key.thumbprints] == [27, 38, 43, 64, 86]
        assert all(keyset.find(t) is key for t in key.thumbprints)
    assert keyset.default_advertisement is None


def test_digest_depends_on_keys_and_visibility_not_names(keys: Path, tmp_path: Path) -> None:
    digest = load_keyset(keys).digest
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for index, path in enumerate(sorted(keys.iterdir())):
        (renamed / f"key{index}.jwk").write_bytes(path.read_bytes())
    assert load_keyset(renamed).digest == digest
    (renamed / "key0.jwk").rename(renamed / ".key0.jwk")
    assert load_keyset(renamed).digest != digest


def test_secret_volume_layout_is_loaded(keys: Path, tmp_path: Path) -> None:
    """A Kubernetes Secret volume: visible names are symlinks through ..data into a timestamped directory."""
    volume = tmp_path / "volume"
    data = volume / "..2026_11_24_00_00_00.000000001"
    data.mkdir(parents=True)
    for path in keys.iterdir():
        (data / path.name).write_bytes(path.read_bytes())
        (volume / path.name).symlink_to(Path("..data") / path.name)
    (volume / "..data").symlink_to(data.name)
    assert load_keyset(volume).digest == load_keyset(keys).digest


@pytest.mark.parametrize("layout", ["empty", "only-hidden"])
def test_ensure_keys_generates_only_without_visible_keys(keys: Path, layout: str) -> None:
    if layout == "empty":
        for path in keys.iterdir():
            path.unlink()
    else:
        for path in keys.iterdir():
            path.rename(keys / f".{path.name}")
    assert len(keyfiles.ensure_keys(keys)) == 2
    assert keyfiles.ensure_keys(keys) == []
    assert len(load_keyset(keys).visible) == 2


def test_permission_problems_are_reported_at_start(keys: Path, tmp_path: Path) -> None:
    assert keyfiles.permission_problems(keys) == []  # as generated: 0440 files
    loose = next(iter(keys.iterdir()))
    loose.chmod(0o644)
    keys.chmod(0o777)
    problems = keyfiles.permission_problems(keys)
    assert len(problems) == 2
    assert any(loose.name in problem for problem in problems)
    with our_server(keys, tmp_path / "log", "--no-auto-keygen") as server:
        assert "readable or writable by other users" in server.log_text()
        assert "is writable by other users" in server.log_text()
