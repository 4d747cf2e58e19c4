"""Real LUKS volumes in plain files, driven with the operators' own tools (cryptsetup, clevis luks, luksmeta).

No device-mapper is needed: `cryptsetup luksFormat`, `clevis luks bind/pass/regen/list/report` and
`cryptsetup open --test-passphrase` all work on an image file. Every command's exit code is checked by the
caller or here, and a failure says the command, its exit code and its output.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .support import thumbprint

TANGD_KEYGEN = Path("/usr/libexec/tangd-keygen")
TANGD_ROTATE_KEYS = Path("/usr/libexec/tangd-rotate-keys")

#: The UUID under which clevis stores its JWE in a LUKS1 header's luksmeta slot.
CLEVIS_LUKSMETA_UUID = "cb6e8904-81ff-40da-a84a-07ab9ab5715e"

#: Bounds a hung command; no command here takes more than a second or two.
COMMAND_TIMEOUT = 60.0

#: The tools these tests run (Debian: cryptsetup, cryptsetup-bin, clevis, clevis-luks, luksmeta, jose, tang, curl).
TOOLS = ("cryptsetup", "clevis", "clevis-luks-bind", "clevis-luks-pass", "clevis-luks-regen", "clevis-luks-list",
         "clevis-luks-report", "luksmeta", "jose", "curl", "tang-show-keys", str(TANGD_KEYGEN),
         str(TANGD_ROTATE_KEYS))  # fmt: skip


def tool_env(tmp: Path) -> dict[str, str]:
    """The environment for the tools: sbin on PATH (cryptsetup), and clevis's header backups in our own TMPDIR."""
    tmpdir = tmp / "tmpdir"
    tmpdir.mkdir(exist_ok=True)
    env = dict(os.environ)
    env["PATH"] = f"{env.get('PATH', '/usr/bin:/bin')}:/usr/sbin:/sbin"
    env["TMPDIR"] = str(tmpdir)
    return env


def run(
    args: Sequence[str | Path],
    env: dict[str, str],
    *,
    stdin: bytes = b"",
    cwd: Path | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    command = [str(arg) for arg in args]
    result = subprocess.run(command, input=stdin, capture_output=True, cwd=cwd, env=env, timeout=COMMAND_TIMEOUT)
    if check and result.returncode != 0:
        raise AssertionError(describe(result))
    return result


def describe(result: subprocess.CompletedProcess[bytes]) -> str:
    out = result.stdout.decode(errors="replace")
    err = result.stderr.decode(errors="replace")
    return f"{result.args} exited {result.returncode}\n--- stdout\n{out}--- stderr\n{err}"


def pin(url: str) -> str:
    """A tang pin configuration, compact (`clevis luks regen` splits `clevis luks list` output on spaces)."""
    return json.dumps({"url": url}, separators=(",", ":"))


def protected_header(jwe: str) -> dict[str, Any]:
    """The protected header of a JWE, compact (`a.b.c.d.e`) or JSON serialization."""
    text = jwe.strip()
    protected = json.loads(text)["protected"] if text.startswith("{") else text.split(".")[0]
    header: dict[str, Any] = json.loads(base64.urlsafe_b64decode(protected + "=" * (-len(protected) % 4)))
    return header


def clevis_encrypt(url: str, plaintext: bytes, env: dict[str, str]) -> bytes:
    """`echo plaintext | clevis encrypt tang '{"url":...}' -y`: the vendor procedure's test file."""
    return run(["clevis", "encrypt", "tang", pin(url), "-y"], env, stdin=plaintext).stdout


def clevis_decrypt(jwe: bytes, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return run(["clevis", "decrypt"], env, stdin=jwe, check=False)


def show_keys(port: int, env: dict[str, str]) -> list[str]:
    """`tang-show-keys PORT`: the advertised signing keys' S256 thumbprints, one per line."""
    return run(["tang-show-keys", str(port)], env).stdout.decode().split()


@dataclass
class Pair:
    """A signing and an exchange key by S256 thumbprint, with their file names."""

    signing: str
    exchange: str
    files: frozenset[str]


def key_pairs(directory: Path) -> dict[bool, Pair]:
    """The directory's visible (True) and hidden (False) pair; fails unless each is exactly one pair or absent."""
    found: dict[bool, dict[str, list[tuple[str, str]]]] = {True: {}, False: {}}
    for path in sorted(directory.iterdir()):
        if not path.name.endswith(".jwk"):
            continue
        key = json.loads(path.read_text())
        kind = "exchange" if "deriveKey" in key.get("key_ops", []) else "signing"
        found[not path.name.startswith(".")].setdefault(kind, []).append((thumbprint(key), path.name))
    pairs = {}
    for visible, kinds in found.items():
        if not kinds:
            continue
        listing = sorted(os.listdir(directory))
        assert len(kinds.get("signing", [])) == 1, f"not one {'visible' if visible else 'hidden'} pair: {listing}"
        assert len(kinds.get("exchange", [])) == 1, f"not one {'visible' if visible else 'hidden'} pair: {listing}"
        (signing, signing_file), (exchange, exchange_file) = kinds["signing"][0], kinds["exchange"][0]
        pairs[visible] = Pair(signing, exchange, frozenset({signing_file, exchange_file}))
    return pairs


@dataclass
class Volume:
    """A LUKS image in a plain file, formatted with a cheap PBKDF, and the passphrase it was formatted with."""

    image: Path
    passphrase_file: Path
    luks: str
    env: dict[str, str]

    @classmethod
    def create(cls, directory: Path, env: dict[str, str], luks: str = "luks2") -> Volume:
        image = directory / f"volume-{luks}.img"
        passphrase_file = directory / f"volume-{luks}.passphrase"
        passphrase_file.write_bytes(os.urandom(24).hex().encode())
        with image.open("wb") as f:
            f.truncate(32 * 1024 * 1024)
        pbkdf = ["--pbkdf", "pbkdf2"] if luks == "luks2" else []
        run(["cryptsetup", "luksFormat", "--type", luks, *pbkdf, "--pbkdf-force-iterations", "1000", "-q",
             "--key-file", passphrase_file, image], env)  # fmt: skip
        return cls(image, passphrase_file, luks, env)

    def bind(self, url: str) -> int:
        """`clevis luks bind -d IMAGE -k KEYFILE -y tang '{"url":...}'`; the slot it bound."""
        before = self.bindings() if self.has_metadata() else {}
        run(["clevis", "luks", "bind", "-d", self.image, "-k", self.passphrase_file, "-y", "tang", pin(url)], self.env)
        added = set(self.bindings()) - set(before)
        assert len(added) == 1, (before, self.bindings())
        return added.pop()

    def has_metadata(self) -> bool:
        """LUKS2 always; LUKS1 once `clevis luks bind` has initialised luksmeta (`clevis luks list` fails before)."""
        if self.luks == "luks2":
            return True
        return run(["luksmeta", "test", "-d", self.image], self.env, check=False).returncode == 0

    def bindings(self) -> dict[int, str]:
        """`clevis luks list -d IMAGE`: slot -> `tang '{"url":...}'`."""
        output = run(["clevis", "luks", "list", "-d", self.image], self.env).stdout.decode()
        found = {}
        for line in output.splitlines():
            match = re.fullmatch(r"(\d+): (.+)", line.strip())
            assert match, f"unexpected `clevis luks list` line: {line!r}"
            found[int(match[1])] = match[2]
        return found

    def jwe(self, slot: int) -> str:
        """The JWE clevis stored for a slot: a LUKS2 token, or the LUKS1 luksmeta slot."""
        if self.luks == "luks1":
            return run(["luksmeta", "load", "-d", self.image, "-s", str(slot), "-u", CLEVIS_LUKSMETA_UUID],
                       self.env).stdout.decode()  # fmt: skip
        metadata = json.loads(run(["cryptsetup", "luksDump", "--dump-json-metadata", self.image], self.env).stdout)
        tokens = [t for t in metadata["tokens"].values() if t["type"] == "clevis" and str(slot) in t["keyslots"]]
        assert len(tokens) == 1, metadata["tokens"]
        return json.dumps(tokens[0]["jwe"])

    def bound_kid(self, slot: int) -> str:
        """The exchange key a slot's binding needs (the JWE's `kid`)."""
        return str(protected_header(self.jwe(slot))["kid"])

    def reveal(self, slot: int) -> subprocess.CompletedProcess[bytes]:
        """`clevis luks pass -d IMAGE -s SLOT`: the slot's passphrase, recovered through the Tang server."""
        return run(["clevis", "luks", "pass", "-d", self.image, "-s", str(slot)], self.env, check=False)

    def opens(self, passphrase: bytes) -> bool:
        """`cryptsetup open --test-passphrase IMAGE --key-file -`: 0 opens, 2 wrong passphrase, else an error."""
        result = run(["cryptsetup", "open", "--test-passphrase", self.image, "--key-file", "-"], self.env,
                     stdin=passphrase, check=False)  # fmt: skip
        assert result.returncode in (0, 2), describe(result)
        return result.returncode == 0

    def unlock(self, slot: int) -> bytes:
        """Unlock as the initramfs would: clevis recovers the slot's passphrase, cryptsetup accepts it."""
        revealed = self.reveal(slot)
        assert revealed.returncode == 0 and revealed.stdout, describe(revealed)
        assert self.opens(revealed.stdout), "cryptsetup rejects the passphrase clevis recovered"
        return revealed.stdout

    def regen(self, slot: int) -> subprocess.CompletedProcess[bytes]:
        """`clevis luks regen -d IMAGE -s SLOT -q`: rebind the slot to the key the server now advertises."""
        return run(["clevis", "luks", "regen", "-d", self.image, "-s", str(slot), "-q"], self.env, check=False)

    def report(self, slot: int) -> subprocess.CompletedProcess[bytes]:
        """`clevis luks report -q -d IMAGE -s SLOT`: exit 1 and the rotated keys' thumbprints, or exit 0."""
        return run(["clevis", "luks", "report", "-q", "-d", self.image, "-s", str(slot)], self.env, check=False)


def rotated_in_report(report: subprocess.CompletedProcess[bytes]) -> set[str]:
    """The thumbprints `clevis luks report` lists as 'not in the current advertisement'."""
    lines = report.stdout.decode().splitlines()
    return {line.strip() for line in lines if line.startswith("  ")}
