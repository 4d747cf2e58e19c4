"""The fleet view and the two-phase rotation driver, against replicas running as separate processes."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from tang_server.keys import keyfiles
from tang_server.keys.keyset import load_keyset
from tang_server.ops.fleet import replica_urls

from .support import BIN, our_server, request

TANG_SERVER = str(BIN / "tang-server")
HANG = 60  # bounds waits for what happens in well under a second: only a hang reaches it


def _eventually(
    run: Callable[[], subprocess.CompletedProcess[str]], done: Callable[[subprocess.CompletedProcess[str]], bool]
) -> subprocess.CompletedProcess[str]:
    deadline = time.monotonic() + HANG
    while not done(result := run()):
        assert time.monotonic() < deadline, result.stdout
        time.sleep(0.1)
    return result


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TANG_SERVER, *args], capture_output=True, text=True, timeout=timeout)


def test_status_and_wait_see_every_worker_and_the_laggards(keys: Path, tmp_path: Path) -> None:
    copies = [tmp_path / "a", tmp_path / "b"]
    for copy in copies:
        shutil.copytree(keys, copy)
    with ExitStack() as stack:
        servers = [
            stack.enter_context(our_server(copy, tmp_path / f"{copy.name}.log", "--no-auto-keygen", workers=2))
            for copy in copies
        ]
        urls = [server.url for server in servers]
        digest = load_keyset(keys).digest
        # Workers report their digest once they have started: wait for all four (two replicas, two workers each).
        status = _eventually(lambda: _cli("fleet", "status", *urls), lambda s: s.stdout.count("pid ") == 4)
        assert status.returncode == 0, status.stdout
        assert f"agreed on {digest[:16]}" in status.stdout

        keyfiles.rotate(copies[1])  # one replica's keys move ahead of the other's
        new = load_keyset(copies[1]).digest
        assert _cli("fleet", "wait", "--digest", new, "--timeout", str(HANG), urls[1]).returncode == 0
        diverged = _cli("fleet", "status", *urls)
        assert diverged.returncode == 1
        assert "DIVERGED" in diverged.stdout

        # The first replica can never catch up (its copy did not change): one look, and it is the laggard.
        waited = _cli("fleet", "wait", "--digest", new, "--timeout", "0", *urls)
        assert waited.returncode == 1
        assert waited.stdout.count("<- lagging") == 2  # both workers of the first replica
        assert servers[0].url in waited.stdout.split("<- lagging")[0]
        assert servers[1].url not in waited.stdout.split("<- lagging")[1]

        shutil.rmtree(copies[0])
        shutil.copytree(copies[1], copies[0])
        assert _cli("fleet", "wait", "--digest", new, "--timeout", str(HANG), *urls).returncode == 0


def test_unreachable_replica_is_reported(keys: Path, tmp_path: Path) -> None:
    with our_server(keys, tmp_path / "log") as server:
        status = _cli("fleet", "status", server.url, "http://127.0.0.1:9")
    assert status.returncode == 1
    assert "UNREACHABLE" in status.stdout


def test_two_phase_rotation_over_a_shared_directory(keys: Path, tmp_path: Path) -> None:
    before = {key.name for key in load_keyset(keys).visible}
    with ExitStack() as stack:
        servers = [
            stack.enter_context(our_server(keys, tmp_path / f"{n}.log", "--no-auto-keygen", workers=2))
            for n in range(2)
        ]
        result = _cli("fleet", "rotate", "--keys-dir", str(keys), *[server.url for server in servers])
        assert result.returncode == 0, result.stdout + result.stderr
        for step in ("1/4 staged", "2/4 waiting", "3/4 promoted", "4/4 waiting", "done"):
            assert step in result.stdout
        final = load_keyset(keys)
        assert {key.name for key in final.hidden} == {f".{name}" for name in before}
        assert _cli("fleet", "wait", "--digest", final.digest, "--timeout", str(HANG),
                    *[server.url for server in servers]).returncode == 0  # fmt: skip


def test_replica_urls_expand_names_to_addresses() -> None:
    assert replica_urls(["http://127.0.0.1:7500", "127.0.0.2"]) == ["http://127.0.0.1:7500", "http://127.0.0.2:7500"]


def test_fleet_mode_refuses_key_generation_and_waits_for_keys(tmp_path: Path) -> None:
    empty = tmp_path / "keys"
    empty.mkdir()
    refused = _cli("serve", "--fleet", "--auto-keygen", "--keys-dir", str(empty))
    assert refused.returncode == 2
    assert "refused" in refused.stderr
    with our_server(empty, tmp_path / "log", "--fleet", workers=2) as server:
        ready = request(server.port, "GET", "/readyz")
        assert ready.status == 503
        assert "no visible signing key" in ready.body.decode()
        assert list(empty.iterdir()) == []  # nothing generated
        keyfiles.generate_keys(empty)  # keys arrive (from a Secret, say): ready at once
        assert request(server.port, "GET", "/readyz").status == 200
