"""Rotation: the single-host `rotate`, the two phases for replicas, deleting hidden keys (crash safety: see
`test_crash_safety.py`)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tang_server.keys import keyfiles
from tang_server.keys.keyset import KeyKind, load_keyset, scan_directory

from .support import BIN, client_key, our_server, request, thumbprint

TANG_SERVER = str(BIN / "tang-server")


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.name.endswith(".jwk")}


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60  # only a hang reaches it
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TANG_SERVER, *args], capture_output=True, text=True, timeout=60)


def test_stage_promote_delete(keys: Path) -> None:
    original = _files(keys)
    staged = _cli("rotate", "--stage", str(keys))
    assert staged.returncode == 0, staged.stderr
    keyset = load_keyset(keys)
    assert {k.name for k in keyset.visible} == set(original)  # nothing new is advertised yet
    assert len(keyset.hidden) == 2
    assert _cli("rotate", "--stage", str(keys)).returncode == 1  # one staged pair at a time

    promoted = _cli("rotate", "--promote", str(keys))
    assert promoted.returncode == 0, promoted.stderr
    keyset = load_keyset(keys)
    assert {k.name for k in keyset.hidden} == {f".{name}" for name in original}
    assert len(keyset.visible) == 2 and not set(original) & {k.name for k in keyset.visible}
    assert _cli("rotate", "--promote", str(keys)).returncode == 1  # nothing staged any more

    # Deleting is explicit and says what it removes; visible keys are refused.
    visible_kid = keyset.visible[0].kid
    refused = _cli("delete-hidden", str(keys), f"--kid={visible_kid}")
    assert refused.returncode == 1 and "not a hidden" in refused.stderr
    hidden_kids = sorted(k.kid for k in keyset.hidden)
    deleted = _cli("delete-hidden", str(keys), f"--kid={keyset.hidden[0].thumbprints[0]}")  # an S1 kid works too
    assert deleted.returncode == 0
    assert deleted.stdout.split()[1] == keyset.hidden[0].kid
    everything = _cli("delete-hidden", str(keys), "--all")
    assert sorted([keyset.hidden[0].kid, everything.stdout.split()[1]]) == hidden_kids
    assert len(load_keyset(keys).hidden) == 0
    assert len(load_keyset(keys).visible) == 2


def test_delete_all_keeps_a_staged_pair(keys: Path) -> None:
    keyfiles.rotate(keys)
    keyfiles.stage(keys)
    removed = keyfiles.delete_hidden(keys, None)
    assert len(removed) == 2
    assert len(keyfiles.staged_names(keys)) == 2


def test_rotate_under_load_has_no_failed_request(keys: Path, tmp_path: Path) -> None:
    old_kid = next(k.kid for k in load_keyset(keys).keys if k.kind is KeyKind.EXCHANGE)
    body = json.dumps(client_key()).encode()
    statuses: dict[str, list[int]] = {"old": [], "new": []}
    stop = threading.Event()

    with our_server(keys, tmp_path / "log", "--no-auto-keygen", workers=2) as server:

        def hammer(label: str, kid_of: Callable[[], str | None]) -> None:
            while not stop.is_set():
                kid = kid_of()
                if kid is None:
                    continue  # the new key file does not exist yet
                statuses[label].append(request(server.port, "POST", f"/rec/{kid}", body).status)

        def new_kid() -> str | None:
            for data in scan_directory(keys).files.values():  # tolerates files renamed while it reads
                if "deriveKey" in data["key_ops"] and thumbprint(data) != old_kid:
                    return thumbprint(data)
            return None

        threads = [
            threading.Thread(target=hammer, args=("old", lambda: old_kid)),
            threading.Thread(target=hammer, args=("new", new_kid)),
        ]
        for thread in threads:
            thread.start()
        try:
            _until(lambda: len(statuses["old"]) > 0, "recoveries before the rotation")
            assert _cli("rotate", str(keys)).returncode == 0
            old_before = len(statuses["old"])
            # Recoveries with the old key after the rotation too, and with the new one.
            _until(lambda: len(statuses["old"]) > old_before and len(statuses["new"]) > 0, "recoveries after it")
        finally:
            stop.set()
            for thread in threads:
                thread.join()
    assert statuses["old"] and statuses["new"]
    assert set(statuses["old"]) == {200}
    assert set(statuses["new"]) == {200}
