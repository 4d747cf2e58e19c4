"""`make dist`: a manylinux abi3 wheel that installs and serves on a host with no Rust toolchain and no C compiler.

The wheel is built by the Makefile's own target, judged by `auditwheel show` (PyPA's checker, not maturin's own
tag), then installed with pip into a fresh virtual environment whose PATH holds the interpreter and nothing else,
together with the locked runtime dependencies from the registry. The installed `tang-server` generates keys,
serves, and its `check` command (and a real clevis round trip) accepts the server; the installed `tangd` serves a
connection in inetd mode.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from .support import BIN, free_port, running

ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 1800.0  # bounds a hang: a cold release build of AWS-LC on two busy cores takes minutes


def _build(out: Path) -> tuple[Path, Path]:
    # -o: use the environment the suite runs in as it is, never rebuild it under the running tests.
    keep = ["-o", ".venv/.runtime-installed", "-o", ".venv/.dev-installed"]
    subprocess.run(["make", "-C", str(ROOT), *keep, "dist", f"DIST={out}"], check=True, capture_output=True,
                   timeout=DEADLINE)  # fmt: skip
    wheels, sdists = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(out.iterdir())
    return wheels[0], sdists[0]


def _compiler_free_path(directory: Path) -> str:
    """A PATH with the interpreter only: no cargo, rustc, cc, gcc, ld."""
    directory.mkdir()
    (directory / "python3").symlink_to(Path(sys.base_prefix) / "bin" / "python3")
    path = str(directory)
    for tool in ("cargo", "rustc", "cc", "gcc", "clang", "ld", "zig", "maturin"):
        assert shutil.which(tool, path=path) is None, tool
    return path


def test_the_wheel_is_manylinux_abi3_and_serves_without_a_compiler(tmp_path: Path) -> None:
    wheel, sdist = _build(tmp_path / "dist")
    assert wheel.name.endswith("-cp311-abi3-manylinux_2_28_x86_64.whl"), wheel.name
    shown = subprocess.run([str(BIN / "auditwheel"), "show", str(wheel)], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert 'consistent\nwith the following platform tag: "manylinux_2_28_x86_64"' in shown.stdout, shown.stdout
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "tang_server/_native.abi3.so" in names and "tang_server/py.typed" in names
    assert not [name for name in names if name.endswith(".rs")]
    subprocess.run(["tar", "-tzf", str(sdist)], check=True, capture_output=True)

    host = {"PATH": _compiler_free_path(tmp_path / "bin"), "HOME": str(Path.home()), "LANG": "C.UTF-8"}
    venv = tmp_path / "venv"
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True, env=host, timeout=DEADLINE)
    pip = [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--require-hashes", "-r", str(ROOT / "requirements" / "runtime.lock")], check=True,
                   env=host, timeout=DEADLINE)  # fmt: skip
    subprocess.run([*pip, "--no-deps", str(wheel)], check=True, env=host, timeout=DEADLINE)
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import tang_server._native as n; print(n.__file__)"],
                           check=True, capture_output=True, text=True, env=host, cwd=tmp_path).stdout  # fmt: skip
    assert where.startswith(str(venv)), where  # the wheel's extension, not this checkout's

    keys, port = tmp_path / "keys", free_port()
    tang_server = str(venv / "bin" / "tang-server")
    serve = [tang_server, "serve", "--keys-dir", str(keys), "--host", "127.0.0.1", "--port", str(port)]
    with running(serve, port, tmp_path / "log", env={**host, "PYTHONUNBUFFERED": "1"}) as server:
        url = server.url
        check = subprocess.run([tang_server, "check", url], capture_output=True, text=True, env=host,
                               timeout=DEADLINE)  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr
        encrypted = subprocess.run(["clevis", "encrypt", "tang", json.dumps({"url": url}), "-y"], input=b"wheel",
                                   capture_output=True, check=True, timeout=DEADLINE).stdout  # fmt: skip
        decrypted = subprocess.run(["clevis", "decrypt"], input=encrypted, capture_output=True, timeout=DEADLINE)
        assert decrypted.stdout == b"wheel", decrypted.stderr
    assert os.listdir(keys)

    # tangd is the wheel's own script (not a console-script entry point): installed, run by this environment's
    # interpreter, and serving one connection on standard input as inetd runs it.
    tangd = venv / "bin" / "tangd"
    assert tangd.read_text().splitlines()[0] in {f"#!{venv}/bin/python", f"#!{venv}/bin/python3"}, tangd.read_text()
    one = subprocess.run([str(tangd), str(keys)], input=b"GET /adv HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
                         capture_output=True, env=host, timeout=DEADLINE)  # fmt: skip
    assert one.stdout.startswith(b"HTTP/1.1 200"), one.stdout[:200] + one.stderr[-2000:]
