"""The operators' procedures (docs: operator-procedures.md), run literally against our server with real LUKS volumes.

Each test binds a LUKS image in a plain file to our server on a real socket with `clevis luks bind`, then runs
exactly what the vendor documentation tells operators to run: the three-step rekey (with the `mv` loop and
`tangd-keygen`, with Debian's `tangd-rotate-keys`, with `tang-server rotate`), the two-phase rotation of replicas
sharing keys behind a load balancer, backup and restore, and the disaster-recovery steps. "The image unlocks"
always means what the initramfs does: `clevis luks pass` recovers the slot's passphrase through the server and
`cryptsetup open --test-passphrase` accepts it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tang_server.keys.keyset import load_keyset

from .luks import (
    TANGD_KEYGEN,
    TANGD_ROTATE_KEYS,
    TOOLS,
    Volume,
    clevis_decrypt,
    clevis_encrypt,
    describe,
    key_pairs,
    pin,
    rotated_in_report,
    run,
    show_keys,
    tool_env,
)
from .support import (
    BIN,
    Server,
    assert_no_secrets,
    free_port,
    private_members,
    require_tools,
    running,
    serve_command,
)

TEST_FILE = b"plaintext\n"


@pytest.fixture(autouse=True)
def _tools() -> None:
    """The tools are installed by `make test`; a missing one fails the test, never skips it."""
    require_tools(*TOOLS, "bash", "haproxy")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return tool_env(tmp_path)


@contextmanager
def serving(keys: Path, port: int, log: Path, *extra: str, workers: int = 1) -> Iterator[Server]:
    """Our server on a given port (so that a restart keeps the URL the volumes are bound to); once stopped, its log
    is checked for the private part of every key it may have seen."""
    secrets = private_members(keys)
    command = serve_command(keys, port, "--drain-seconds", "0", *extra, workers=workers)  # stop at once
    with running(command, port, log) as server:
        yield server
        secrets |= private_members(keys)
    assert_no_secrets(log.read_text(errors="replace"), secrets)


def tang_server(*args: str | Path) -> list[str]:
    return [str(BIN / "tang-server"), *(str(arg) for arg in args)]


# --- 1 and 2: the three-step rekey on one server ------------------------------------------------------------------


def hide_and_keygen(keys: Path, env: dict[str, str]) -> None:
    """The vendor documentation, verbatim: hide every key with the `mv` loop, then `tangd-keygen`."""
    run(["bash", "-c", 'for key in *.jwk; do mv -- "$key" ".$key"; done'], env, cwd=keys)
    run([TANGD_KEYGEN, keys], env)


def tangd_rotate_keys(keys: Path, env: dict[str, str]) -> None:
    run([TANGD_ROTATE_KEYS, "-d", keys], env)


def our_rotate(keys: Path, env: dict[str, str]) -> None:
    run(tang_server("rotate", keys), env)


NEW_SERVER_KEY: dict[str, Callable[[Path, dict[str, str]], None]] = {
    "mv-loop+tangd-keygen": hide_and_keygen,
    "tangd-rotate-keys": tangd_rotate_keys,
    "tang-server-rotate": our_rotate,
}


@pytest.mark.parametrize(
    ("procedure", "luks"),
    [
        ("mv-loop+tangd-keygen", "luks2"),
        ("mv-loop+tangd-keygen", "luks1"),
        ("tangd-rotate-keys", "luks2"),
        ("tang-server-rotate", "luks2"),
    ],
)
def test_three_step_rekey(tmp_path: Path, env: dict[str, str], procedure: str, luks: str) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    run([TANGD_KEYGEN, keys], env)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with serving(keys, port, tmp_path / "server.log", workers=2):
        old = key_pairs(keys)[True]
        assert show_keys(port, env) == [old.signing]

        volume = Volume.create(tmp_path, env, luks)
        slot = volume.bind(url)
        assert volume.bindings() == {slot: f"tang '{pin(url)}'"}
        assert volume.bound_kid(slot) == old.exchange
        volume.unlock(slot)
        encrypted_old = clevis_encrypt(url, TEST_FILE, env)
        assert clevis_decrypt(encrypted_old, env).stdout == TEST_FILE

        # Step 1: a new server key. The old pair is hidden (still answering recoveries), one new pair is visible.
        NEW_SERVER_KEY[procedure](keys, env)
        listing = sorted(os.listdir(keys))  # `ls -A1`: the old pair hidden, one new pair, nothing else
        hidden = {name for name in listing if name.startswith(".")}
        assert hidden == {f".{name}" for name in old.files}, listing
        assert len(listing) == 4, f"not exactly one new pair after step 1: {listing}"
        pairs = key_pairs(keys)
        new = pairs[True]
        assert pairs[False].signing == old.signing and pairs[False].exchange == old.exchange
        assert new.signing != old.signing and new.exchange != old.exchange
        assert show_keys(port, env) == [new.signing]
        assert clevis_decrypt(encrypted_old, env).stdout == TEST_FILE
        volume.unlock(slot)  # still bound to the old, hidden key
        report = volume.report(slot)
        assert report.returncode == 1, describe(report)
        assert rotated_in_report(report) == {old.signing, old.exchange}, describe(report)

        # Step 2: rekey the client.
        regen = volume.regen(slot)
        assert regen.returncode == 0, describe(regen)
        assert volume.bindings() == {slot: f"tang '{pin(url)}'"}
        assert volume.bound_kid(slot) == new.exchange
        assert volume.report(slot).returncode == 0, describe(volume.report(slot))
        volume.unlock(slot)

        # Step 3: delete the old key.
        run(["bash", "-c", "rm .*.jwk"], env, cwd=keys)
        assert set(os.listdir(keys)) == new.files
        assert show_keys(port, env) == [new.signing]
        after = clevis_decrypt(encrypted_old, env)
        assert after.returncode != 0 and TEST_FILE not in after.stdout, describe(after)
        volume.unlock(slot)
        assert set(os.listdir(keys)) == new.files  # and the server added nothing on the way


def test_deleting_the_old_key_before_regen_strands_the_volume(tmp_path: Path, env: dict[str, str]) -> None:
    """The warning of step 3, and proof that the unlock check can fail: delete before the client is rekeyed and
    the image no longer unlocks through the server, although the server runs and advertises a key."""
    keys = tmp_path / "keys"
    keys.mkdir()
    run([TANGD_KEYGEN, keys], env)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with serving(keys, port, tmp_path / "server.log"):
        volume = Volume.create(tmp_path, env)
        slot = volume.bind(url)
        volume.unlock(slot)
        our_rotate(keys, env)
        run(["bash", "-c", "rm .*.jwk"], env, cwd=keys)
        assert len(show_keys(port, env)) == 1
        revealed = volume.reveal(slot)
        assert revealed.returncode != 0, describe(revealed)
        with pytest.raises(AssertionError):
            volume.unlock(slot)
        regen = volume.regen(slot)  # regen needs the old key too: the volume is stranded
        assert regen.returncode != 0, describe(regen)
        assert volume.opens(volume.passphrase_file.read_bytes())  # only the original passphrase remains


def test_checking_the_configuration_by_thumbprint(tmp_path: Path, env: dict[str, str]) -> None:
    """`clevis encrypt tang` pinned to a wrong thumbprint fails with the reference's message; the right one works."""
    keys = tmp_path / "keys"
    keys.mkdir()
    run([TANGD_KEYGEN, keys], env)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with serving(keys, port, tmp_path / "server.log"):
        [thp] = show_keys(port, env)
        bad = run(["clevis", "encrypt", "tang", json.dumps({"url": url, "thp": "BAD"})], env, stdin=b"okay\n",
                  check=False)  # fmt: skip
        assert bad.returncode != 0
        assert f"Unable to fetch advertisement: '{url}/adv/BAD'" in bad.stderr.decode(), describe(bad)
        good = run(["clevis", "encrypt", "tang", json.dumps({"url": url, "thp": thp})], env, stdin=b"okay\n")
        assert clevis_decrypt(good.stdout, env).stdout == b"okay\n"


# --- 3: replicas sharing keys behind a load balancer, two-phase rotation ------------------------------------------

REPLICAS = 3

# Round robin, no health checks, no retries, no redispatch: every request reaches the next replica and a replica
# that cannot answer shows up as a failure instead of being hidden by the balancer.
HAPROXY = """
global
    maxconn 200
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    retries 0
frontend tang
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance roundrobin
{servers}
"""


@dataclass
class Fleet:
    keys: Path
    replicas: list[Server]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def recoveries(self) -> list[int]:
        """How many `POST /rec/` each replica has logged."""
        return [server.log_text().count('"POST /rec/') for server in self.replicas]

    def wait(self, env: dict[str, str]) -> None:
        """`tang-server fleet wait`: every worker of every replica serves the directory's current key set."""
        digest = load_keyset(self.keys).digest
        urls = [server.url for server in self.replicas]
        run(tang_server("fleet", "wait", "--digest", digest, "--timeout", "30", *urls), env)

    def on_every_replica(self, action: Callable[[], object]) -> None:
        """Run a one-recovery action once per replica, in a row: round robin sends one to each replica."""
        before = self.recoveries()
        for _ in self.replicas:
            action()
        deadline = time.monotonic() + 10  # the access log line is written just after the response
        while sum(self.recoveries()) < sum(before) + len(self.replicas) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [a - b for a, b in zip(self.recoveries(), before, strict=True)] == [1] * len(self.replicas)


@contextmanager
def fleet(tmp_path: Path, env: dict[str, str]) -> Iterator[Fleet]:
    keys = tmp_path / "shared-keys"
    keys.mkdir()
    run(tang_server("keygen", keys), env)
    with ExitStack() as stack:
        replicas = []
        for index in range(REPLICAS):
            port = free_port()
            log = tmp_path / f"replica{index}.log"
            replicas.append(stack.enter_context(serving(keys, port, log, "--fleet", workers=2)))
        port = free_port()
        servers = "\n".join(f"    server r{i} 127.0.0.1:{s.port}" for i, s in enumerate(replicas))
        config = tmp_path / "haproxy.cfg"
        config.write_text(HAPROXY.format(port=port, servers=servers))
        run(["haproxy", "-c", "-f", config], env)
        stack.enter_context(running(["haproxy", "-db", "-f", str(config)], port, tmp_path / "haproxy.log"))
        f = Fleet(keys, replicas, port)
        f.wait(env)
        yield f


def test_replicas_behind_a_load_balancer_two_phase_rotation(tmp_path: Path, env: dict[str, str]) -> None:
    with fleet(tmp_path, env) as f:
        old = key_pairs(f.keys)[True]
        volume = Volume.create(tmp_path, env)
        slot = volume.bind(f.url)
        assert volume.bound_kid(slot) == old.exchange
        f.on_every_replica(lambda: volume.unlock(slot))
        encrypted_old = clevis_encrypt(f.url, TEST_FILE, env)

        def decrypts_old() -> None:
            assert clevis_decrypt(encrypted_old, env).stdout == TEST_FILE

        def fails_old() -> None:
            result = clevis_decrypt(encrypted_old, env)
            assert result.returncode != 0 and TEST_FILE not in result.stdout, describe(result)

        # Phase one: the new pair is added hidden; every replica must hold it before it is advertised.
        run(tang_server("rotate", "--stage", f.keys), env)
        f.wait(env)
        for _ in f.replicas:
            assert show_keys(f.port, env) == [old.signing]
        f.on_every_replica(lambda: volume.unlock(slot))

        # Phase two: promote; the old pair is hidden and keeps answering.
        run(tang_server("rotate", "--promote", f.keys), env)
        f.wait(env)
        pairs = key_pairs(f.keys)
        new = pairs[True]
        assert (pairs[False].signing, pairs[False].exchange) == (old.signing, old.exchange)
        assert new.signing != old.signing
        for _ in f.replicas:
            assert show_keys(f.port, env) == [new.signing]
        f.on_every_replica(lambda: volume.unlock(slot))
        f.on_every_replica(decrypts_old)

        # Rekey the client through the balancer.
        regen = volume.regen(slot)
        assert regen.returncode == 0, describe(regen)
        assert volume.bound_kid(slot) == new.exchange
        f.on_every_replica(lambda: volume.unlock(slot))

        # Delete the old pair.
        deleted = run(tang_server("delete-hidden", f.keys, "--all"), env).stdout.decode()
        assert {line.split()[1] for line in deleted.splitlines()} == {old.signing, old.exchange}, deleted
        assert set(os.listdir(f.keys)) == new.files
        f.wait(env)
        f.on_every_replica(lambda: volume.unlock(slot))
        f.on_every_replica(fails_old)
        for _ in f.replicas:
            assert show_keys(f.port, env) == [new.signing]


# --- 4: backup and restore ----------------------------------------------------------------------------------------


def test_backup_and_restore(tmp_path: Path, env: dict[str, str]) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    run([TANGD_KEYGEN, keys], env)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    volume = Volume.create(tmp_path, env)
    with serving(keys, port, tmp_path / "server-1.log"):
        slot = volume.bind(url)
        encrypted = clevis_encrypt(url, TEST_FILE, env)
        tangd_rotate_keys(keys, env)  # the volume and the file now depend on a hidden key
        current = show_keys(port, env)
        volume.unlock(slot)

    backup = tmp_path / "backup"
    run(["cp", "-a", keys, backup], env)
    contents = {name: (keys / name).read_bytes() for name in os.listdir(keys)}
    assert len([name for name in contents if name.startswith(".")]) == 2  # hidden keys are in the backup

    # Lose the directory: a server on an empty directory makes new keys, and the volume no longer unlocks.
    shutil.rmtree(keys)
    keys.mkdir()
    with serving(keys, port, tmp_path / "server-2.log"):
        assert len(show_keys(port, env)) == 1
        assert show_keys(port, env) != current
        assert volume.reveal(slot).returncode != 0
        assert clevis_decrypt(encrypted, env).returncode != 0

    # Restore the backup, restart the server.
    shutil.rmtree(keys)
    run(["cp", "-a", backup, keys], env)
    assert {name: (keys / name).read_bytes() for name in os.listdir(keys)} == contents
    with serving(keys, port, tmp_path / "server-3.log"):
        assert show_keys(port, env) == current
        volume.unlock(slot)
        assert clevis_decrypt(encrypted, env).stdout == TEST_FILE


# --- 5: disaster recovery -----------------------------------------------------------------------------------------


def test_planned_outage_reveal_then_regen(tmp_path: Path, env: dict[str, str]) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    run([TANGD_KEYGEN, keys], env)
    port = free_port()
    volume = Volume.create(tmp_path, env)
    with serving(keys, port, tmp_path / "server-1.log"):
        slot = volume.bind(f"http://127.0.0.1:{port}")
        # Before the outage: reveal the passphrase for the on-site technician.
        revealed = volume.reveal(slot)
        assert revealed.returncode == 0 and revealed.stdout, describe(revealed)
        assert volume.opens(revealed.stdout)

    # During the outage the server cannot be reached: clevis cannot unlock, the technician's passphrase can.
    down = volume.reveal(slot)
    assert down.returncode != 0, describe(down)
    assert volume.opens(revealed.stdout)

    with serving(keys, port, tmp_path / "server-2.log"):
        # Afterwards: regen invalidates the revealed passphrase; the new binding unlocks.
        regen = volume.regen(slot)
        assert regen.returncode == 0, describe(regen)
        assert not volume.opens(revealed.stdout)
        assert volume.unlock(slot) != revealed.stdout
        assert volume.opens(volume.passphrase_file.read_bytes())  # the other slots are untouched
