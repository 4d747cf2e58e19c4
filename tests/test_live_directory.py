"""The key directory changing under a live server: Kubernetes Secret volume updates, accidents, failures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from tang_server.keys import b64, keyfiles
from tang_server.keys.keyset import load_keyset

from .support import (
    SecretVolume,
    Server,
    client_key,
    free_port,
    load_keys,
    our_server,
    request,
    running,
    serve_command,
    thumbprint,
)


def _advertised(port: int) -> set[str]:
    response = request(port, "GET", "/adv")
    assert response.status == 200, response.status
    payload = json.loads(b64.decode(json.loads(response.body)["payload"]))
    return {thumbprint(key) for key in payload["keys"]}


def _rec(port: int, kid: str) -> int:
    return request(port, "POST", f"/rec/{kid}", json.dumps(client_key()).encode()).status


def _pair_files() -> tuple[dict[str, bytes], str, str]:
    signing, exchange = keyfiles.generate_pair()
    files = {keyfiles.key_file_name(k): json.dumps(k).encode() for k in (signing, exchange)}
    return files, thumbprint(signing), thumbprint(exchange)


def test_kubelet_secret_updates_are_served_at_once(tmp_path: Path) -> None:
    volume = SecretVolume(tmp_path / "volume")
    files, sig, exc = _pair_files()
    volume.publish(files)
    with our_server(volume.path, tmp_path / "log", "--no-auto-keygen", workers=2) as server:
        assert _advertised(server.port) == {sig, exc}
        for _ in range(8):
            # stage: a new pair hidden; then promote: new visible, old hidden; then drop the old pair
            new, new_sig, new_exc = _pair_files()
            staged = {**files, **{f".{name}": data for name, data in new.items()}}
            volume.publish(staged)
            assert _advertised(server.port) == {sig, exc}
            assert _rec(server.port, new_exc) == 200
            promoted = {**new, **{f".{name}": data for name, data in files.items()}}
            volume.publish(promoted)
            assert _advertised(server.port) == {new_sig, new_exc}
            assert _rec(server.port, exc) == 200  # the old key, hidden, still answers
            volume.publish(new)
            assert _rec(server.port, exc) == 404  # deleted: gone on the next request
            files, sig, exc = new, new_sig, new_exc


@pytest.fixture
def server_keys(keys: Path, tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    with our_server(keys, tmp_path / "log", "--no-auto-keygen", workers=2) as server:
        yield server, keys


def test_half_written_new_file_changes_nothing_until_complete(server_keys: tuple[Server, Path]) -> None:
    server, keys = server_keys
    before = _advertised(server.port)
    signing, _ = keyfiles.generate_pair()
    data = json.dumps(signing).encode()
    path = keys / "incoming.jwk"
    with path.open("wb") as file:
        file.write(data[: len(data) // 2])
        file.flush()
        assert _advertised(server.port) == before
        file.write(data[len(data) // 2 :])
    assert _advertised(server.port) == before | {thumbprint(signing)}
    assert "skipping key file" in server.log_text()


def test_key_rewritten_in_place_keeps_answering(server_keys: tuple[Server, Path]) -> None:
    server, keys = server_keys
    _, exchange = load_keys(keys)
    path = keys / f"{thumbprint(exchange)}.jwk"
    data = path.read_bytes()
    os.chmod(path, 0o640)
    with path.open("r+b") as file:  # a tool rewriting the file in place: truncate, then write
        file.truncate(0)
        file.flush()
        assert _rec(server.port, thumbprint(exchange)) == 200
        file.write(data[:40])
        file.flush()
        assert _rec(server.port, thumbprint(exchange)) == 200
        file.write(data[40:])
    assert _rec(server.port, thumbprint(exchange)) == 200


def _recreate(keys: Path) -> tuple[str, str]:
    files, sig, exc = _pair_files()
    keys.mkdir()
    for name, data in files.items():
        (keys / name).write_bytes(data)
    return sig, exc


def test_directory_moved_away_keeps_serving_then_recreated(server_keys: tuple[Server, Path], tmp_path: Path) -> None:
    server, keys = server_keys
    before = _advertised(server.port)
    keys.rename(tmp_path / "elsewhere")
    for _ in range(3):
        assert _advertised(server.port) == before  # nothing to read: the last set keeps serving
    assert 1 <= server.log_text().count("cannot read key directory") <= 2  # once per worker that noticed
    sig, exc = _recreate(keys)
    assert _advertised(server.port) == {sig, exc}
    assert _rec(server.port, exc) == 200
    assert "readable again" in server.log_text()


def test_directory_deleted_and_recreated(server_keys: tuple[Server, Path]) -> None:
    server, keys = server_keys
    shutil.rmtree(keys)  # deletes every key first (deliberate), then the directory
    assert request(server.port, "GET", "/adv").status in (200, 500)
    sig, exc = _recreate(keys)
    assert _advertised(server.port) == {sig, exc}
    assert _rec(server.port, exc) == 200


#: Root reads anything through these two capabilities; without them root is held to the permission bits.
_WITHOUT_DAC_BYPASS = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all"]


def test_unreadable_directory_keeps_last_set(tmp_path: Path) -> None:
    """The directory's permissions are taken away while the server runs.

    Root ignores permission bits, so the server runs as root *without* the two capabilities that bypass them
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) rather than as another user: another user could not reach the
    interpreter when the checkout, the virtual environment or the Python installation sits under a directory only
    root may enter (a clone in /root, mode 0700), while root without those capabilities still can, as their owner.
    """
    keys = tmp_path / "keys"
    keyfiles.generate_keys(keys)
    port = free_port()
    command = [*_WITHOUT_DAC_BYPASS, *serve_command(keys, port, "--no-auto-keygen")]
    with running(command, port, tmp_path / "log") as server:
        _, exchange = load_keys(keys)
        before = _advertised(server.port)
        os.chmod(keys, 0o000)
        (keys / "new.jwk").write_text(json.dumps(keyfiles.generate_pair()[0]))  # a change it cannot read
        assert _advertised(server.port) == before
        assert _rec(server.port, thumbprint(exchange)) == 200
        os.chmod(keys, 0o700)
        assert len(_advertised(server.port)) == 3  # readable again: the change is picked up
        log = server.log_text()
    assert log.count("cannot read key directory") == 1  # reported once, not once per request
    assert "readable again" in log


def test_periodic_recheck_catches_changes_inotify_cannot_see(tmp_path: Path) -> None:
    """Visible names are symlinks to another directory, whose files change without an event in ours."""
    elsewhere, keys = tmp_path / "elsewhere", tmp_path / "keys"
    elsewhere.mkdir()
    keys.mkdir()
    files, sig, _ = _pair_files()
    for name, data in files.items():
        (elsewhere / name).write_bytes(data)
        (keys / name).symlink_to(elsewhere / name)
    with our_server(keys, tmp_path / "log", "--no-auto-keygen", "--recheck-seconds", "0.5") as server:
        assert sig in _advertised(server.port)
        signing_name = next(name for name in files if name.endswith(f"{sig}.jwk"))
        replacement, _ = keyfiles.generate_pair()
        (elsewhere / "tmp").write_text(json.dumps(replacement))
        os.rename(elsewhere / "tmp", elsewhere / signing_name)  # no event in the watched directory
        deadline = time.monotonic() + 10
        while thumbprint(replacement) not in _advertised(server.port):
            assert time.monotonic() < deadline, "the periodic re-check never picked the change up"
            time.sleep(0.1)
        assert "periodic re-check found changes" in server.log_text()


def test_auto_keygen_on_first_start_creates_directory(tmp_path: Path) -> None:
    keys = tmp_path / "new" / "keys"
    with our_server(keys, tmp_path / "log") as server:
        assert len(_advertised(server.port)) == 2
    assert sorted(oct(p.stat().st_mode & 0o777) for p in keys.iterdir()) == ["0o440", "0o440"]
    result = subprocess.run(["stat", "-c", "%a", str(keys)], capture_output=True, text=True)
    assert result.stdout.strip() == "750"


def test_kubelet_window_with_dangling_links_keeps_the_keys(tmp_path: Path) -> None:
    """Between the ..data swap and the new top-level links, renamed keys' old links dangle: not a deletion."""
    volume = SecretVolume(tmp_path / "volume")
    files, _, _ = _pair_files()
    volume.publish(files)
    before = load_keyset(volume.path)
    # The kubelet's steps 1-3 for an update that renames every key (a promotion hides them): new data directory,
    # ..data swapped to it, new top-level links not created yet.
    new = volume.path / "..2026_11_24_99"
    new.mkdir()
    for name, data in files.items():
        (new / f".{name}").write_bytes(data)
    os.symlink(new.name, volume.path / "..data_tmp")
    os.rename(volume.path / "..data_tmp", volume.path / "..data")
    assert all(not (volume.path / name).exists() for name in files)  # every visible link dangles now
    during = load_keyset(volume.path, previous=before)
    assert during.digest == before.digest  # nothing lost in the window
    assert load_keyset(volume.path).keys == ()  # (without a previous set there is nothing to keep)


def _hide_everything(keys: Path) -> set[str]:
    names = {path.name for path in keys.iterdir() if path.name.endswith(".jwk")}
    for name in names:
        os.rename(keys / name, keys / f".{name}")
    return {f".{name}" for name in names}


def _lock_waiters(directory: Path) -> set[int]:
    """Processes waiting for a flock on `directory` (the `->` lines of /proc/locks)."""
    inode = f":{directory.stat().st_ino} "
    waiting = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] == "->" and fields[2] == "FLOCK" and inode in line:
            waiting.add(int(fields[5]))
    return waiting


def test_a_request_finding_no_visible_key_generates_one_pair(keys: Path, tmp_path: Path) -> None:
    """As the reference: the request generates the pair and is answered from it. Both workers are made to decide
    to generate at once (the test holds the directory lock until each waits for it); one pair is written."""
    with our_server(keys, tmp_path / "log", "--drain-seconds", "0", workers=2) as server:
        hidden = _hide_everything(keys)
        answers: list[Future[set[str]]] = []
        # The lock is released first, then the pool waits for every request (many threads: requests held by one
        # worker must not starve the other).
        with ThreadPoolExecutor(64) as pool, keyfiles.directory_lock(keys):
            deadline = time.monotonic() + 20
            while len(_lock_waiters(keys)) < 2:  # new connections until each worker has one waiting
                assert time.monotonic() < deadline, "both workers never waited to generate"
                answers.append(pool.submit(_advertised, server.port))
                time.sleep(0.02)
        # every request has been answered (the pool is shut down)
        names = {path.name for path in keys.iterdir()}
        new = names - hidden
        assert len(new) == 2 and not any(name.startswith(".") for name in new), names
        pair = {thumbprint(json.loads((keys / name).read_text())) for name in new}
        assert all(answer.result() == pair for answer in answers)  # each answered 200 from the new pair
        assert server.log_text().count("generated key") == 2


@pytest.mark.parametrize("option", ["--no-auto-keygen", "--fleet"])
def test_without_key_generation_a_request_writes_nothing(keys: Path, tmp_path: Path, option: str) -> None:
    with our_server(keys, tmp_path / "log", option, "--drain-seconds", "0") as server:
        hidden = _hide_everything(keys)
        assert request(server.port, "GET", "/adv").status == 500
        _, exchange = load_keys(keys)
        assert _rec(server.port, thumbprint(exchange)) == 200  # hidden keys still answer
        assert {path.name for path in keys.iterdir()} == hidden


def test_the_watcher_and_the_probes_never_generate(keys: Path, tmp_path: Path) -> None:
    """The directory changing (every key hidden) is loaded, by the watcher and the periodic re-check, and shown by
    /readyz and /status, without a key being written: only a Tang request generates."""
    with our_server(keys, tmp_path / "log", "--recheck-seconds", "0.2", "--drain-seconds", "0") as server:
        hidden = _hide_everything(keys)
        deadline = time.monotonic() + 10
        while request(server.port, "GET", "/readyz").status != 503:  # the hidden keys are loaded
            assert time.monotonic() < deadline, "the change was never loaded, or a pair was generated"
            time.sleep(0.05)
        status = json.loads(request(server.port, "GET", "/status").body)
        assert status["visible"] == [] and len(status["hidden"]) == 2
        loaded_at = status["loaded_at"]
        while json.loads(request(server.port, "GET", "/status").body)["loaded_at"] == loaded_at:
            assert time.monotonic() < deadline + 10, "the watcher never reloaded"
            (keys / "unrelated.txt").write_text(str(time.monotonic()))  # an event: the watcher reloads
            time.sleep(0.05)
        assert {path.name for path in keys.iterdir() if path.name.endswith(".jwk")} == hidden
        assert len(_advertised(server.port)) == 2  # the first Tang request generates
