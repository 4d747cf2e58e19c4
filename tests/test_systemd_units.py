"""The systemd units shipped in deploy/systemd: valid for systemd, hardened, and their command lines serve.

systemd is not running here, but `systemd-analyze verify` and `systemd-analyze security --offline=true` judge
unit files offline, and `systemd-socket-activate` starts the service's own ExecStart line as the socket unit
would. verify insists that ExecStart's binary exists, so the units are checked with /usr/local/bin (where
`pip install` puts the commands on a host) replaced by this environment's bin directory.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from .support import BIN, free_port

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "deploy" / "systemd"
DEADLINE = 60.0  # bounds a hang

#: systemd-analyze's overall exposure, times ten, at or below which the services must stay. 0.4 is reached with
#: every sandboxing setting the server can take, a private network included (systemd's sockets are passed in from
#: the host's namespace); what is left is allocating Internet and local sockets and the host's root directory.
EXPOSURE_LIMIT = 5


def _installed_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "units"
    copy.mkdir()
    for unit in (path for path in UNITS.iterdir() if path.is_file()):  # not sysusers.d/, tmpfiles.d/
        (copy / unit.name).write_text(unit.read_text().replace("/usr/local/bin/", f"{BIN}/"))
    return copy


def test_every_unit_verifies(tmp_path: Path) -> None:
    units = sorted(str(path) for path in _installed_copy(tmp_path).iterdir())
    names = {Path(unit).name for unit in units}
    assert names == {"tang-server.socket", "tang-server.service", "tangd.socket", "tangd@.service"}
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True,
                            env={"SYSTEMD_LOG_LEVEL": "notice", "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_services_are_hardened(tmp_path: Path) -> None:
    copy = _installed_copy(tmp_path)
    for service in ("tang-server.service", "tangd@.service"):
        result = subprocess.run(
            ["systemd-analyze", "security", "--offline=true", f"--threshold={EXPOSURE_LIMIT}", str(copy / service)],
            capture_output=True, text=True,
        )  # fmt: skip
        score = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
        assert score is not None, result.stdout + result.stderr
        print(f"{service}: exposure {score[1]}")
        assert result.returncode == 0, result.stdout


def _exec_start(unit: str) -> list[str]:
    line = next(line for line in (UNITS / unit).read_text().splitlines() if line.startswith("ExecStart="))
    return shlex.split(line.removeprefix("ExecStart="))


def test_the_service_command_line_serves_under_socket_activation(tmp_path: Path) -> None:
    """tang-server.socket's port and tang-server.service's ExecStart, with their paths moved under tmp_path,
    under MemoryDenyWriteExecute's kernel counterpart (PR_SET_MDWE): a clevis round trip and a clean stop."""
    command = [arg.replace("/usr/local/bin/", f"{BIN}/").replace("/var/lib/", f"{tmp_path}/lib/")
               .replace("/var/db/", f"{tmp_path}/db/").replace("/run/", f"{tmp_path}/run/")
               for arg in _exec_start("tang-server.service")]  # fmt: skip
    for argument in command:
        if argument.startswith("--keys-dir=") or argument.startswith("--state-dir="):
            Path(argument.split("=", 1)[1]).mkdir(parents=True)
    port = free_port()
    mdwe = [sys.executable, "-c", _REFUSE_WRITE_EXECUTE]
    activate = ["systemd-socket-activate", "-l", f"127.0.0.1:{port}"]
    with (tmp_path / "log").open("wb") as log:
        process = subprocess.Popen([*activate, *mdwe, *command], stderr=log)
    try:
        config = json.dumps({"url": f"http://127.0.0.1:{port}"})
        encrypted = subprocess.run(["clevis", "encrypt", "tang", config, "-y"], input=b"unit", capture_output=True,
                                   check=True, timeout=DEADLINE).stdout  # fmt: skip
        decrypted = subprocess.run(["clevis", "decrypt"], input=encrypted, capture_output=True, timeout=DEADLINE)
        assert decrypted.stdout == b"unit", (tmp_path / "log").read_text()
        process.send_signal(signal.SIGTERM)
        assert process.wait(DEADLINE) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# Refuses write+execute memory for itself and everything it execs (what MemoryDenyWriteExecute=yes enforces),
# then execs the service; a runtime that needed such memory would fail its first round trip.
_REFUSE_WRITE_EXECUTE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0 or libc.prctl(66, 0, 0, 0, 0) != 1:  # PR_SET_MDWE, PR_GET_MDWE
    sys.exit("PR_SET_MDWE failed")
os.execv(sys.argv[1], sys.argv[1:])
"""


def test_socket_units_listen_where_the_documentation_says() -> None:
    for unit, accept in (("tang-server.socket", "no"), ("tangd.socket", "yes")):
        text = (UNITS / unit).read_text()
        assert "ListenStream=7500" in text and f"Accept={accept}" in text


def test_sysusers_and_tmpfiles_give_the_key_directory_to_the_service_user(tmp_path: Path) -> None:
    """sysusers.d creates the unit's User=, tmpfiles.d creates /var/db/tang 0700 for it and hands it keys a root
    shell wrote, modes unchanged: applied by systemd's own tools to an image root (--root works offline)."""
    root = tmp_path / "root"
    keys = root / "var" / "db" / "tang"
    keys.mkdir(parents=True)
    (root / "etc").mkdir()
    written_by_root = keys / "key.jwk"
    written_by_root.write_text("{}")
    written_by_root.chmod(0o440)
    subprocess.run(["systemd-sysusers", f"--root={root}", str(UNITS / "sysusers.d" / "tang-server.conf")],
                   check=True, capture_output=True)  # fmt: skip
    subprocess.run(["systemd-tmpfiles", f"--root={root}", "--create", str(UNITS / "tmpfiles.d" / "tang-server.conf")],
                   check=True, capture_output=True)  # fmt: skip
    service = (UNITS / "tang-server.service").read_text()
    user = re.search(r"^User=(\S+)$", service, re.MULTILINE)
    assert user is not None and f"--keys-dir={'/' / keys.relative_to(root)}" in service
    entry = next(line.split(":") for line in (root / "etc" / "passwd").read_text().splitlines()
                 if line.startswith(f"{user[1]}:"))  # fmt: skip
    uid, gid = int(entry[2]), int(entry[3])
    assert uid != 0
    assert (keys.stat().st_uid, keys.stat().st_gid, keys.stat().st_mode & 0o7777) == (uid, gid, 0o700)
    key = written_by_root.stat()
    assert (key.st_uid, key.st_gid, key.st_mode & 0o7777) == (uid, gid, 0o440)
