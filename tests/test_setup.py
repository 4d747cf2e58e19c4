"""The setup a newcomer runs: prerequisites named plainly, and the locked dependency set actually installed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements"
#: What `make run` reads before it builds anything.
SETUP_FILES = ("Makefile", "pyproject.toml", "Cargo.toml", "tools", "requirements")


def _tool_directory(tmp_path: Path, leave_out: Iterable[str]) -> Path:
    """A PATH directory holding every command this machine has except `leave_out` (a machine without them)."""
    tools = tmp_path / "bin"
    tools.mkdir()
    left_out = set(leave_out)
    directories = [Path(d) for d in os.environ["PATH"].split(os.pathsep) if d] + [Path("/usr/bin"), Path("/bin")]
    for directory in directories:
        if not directory.is_dir() or directory == Path(sys.executable).parent:
            continue
        for command in directory.iterdir():
            if command.name in left_out or os.path.lexists(tools / command.name):
                continue
            if command.is_file() and os.access(command, os.X_OK):
                (tools / command.name).symlink_to(command)
    return tools


def _make_run_without(tmp_path: Path, leave_out: Iterable[str]) -> subprocess.CompletedProcess[str]:
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in SETUP_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, checkout / name)
        else:
            shutil.copy2(source, checkout / name)
    path = _tool_directory(tmp_path, leave_out)
    env = {"PATH": str(path), "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
    result = subprocess.run(
        ["make", "run", "PYTHON=python3"], cwd=checkout, env=env, capture_output=True, text=True, timeout=120
    )
    assert not (checkout / ".venv").exists(), "it started setting up before it knew it could finish"
    return result


def _missing_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("missing prerequisite:")]


def test_make_run_without_rust_names_the_toolchain(tmp_path: Path) -> None:
    result = _make_run_without(tmp_path, ["cargo", "rustc", "rustup"])
    assert result.returncode != 0
    lines = _missing_lines(result)
    assert len(lines) == 1, result.stderr
    assert "Rust toolchain" in lines[0] and "1.80" in lines[0]


def test_make_run_without_a_c_compiler_names_it(tmp_path: Path) -> None:
    result = _make_run_without(tmp_path, ["cc", "gcc", "c99", "c89", "x86_64-linux-gnu-gcc", "gcc-12"])
    assert result.returncode != 0
    lines = _missing_lines(result)
    assert len(lines) == 1, result.stderr
    assert "C compiler" in lines[0]


def _pins(lock: Path) -> dict[str, list[tuple[Version, Marker | None]]]:
    """name -> (version, environment marker) of every pin in a lock file (continuation lines skipped)."""
    pins: dict[str, list[tuple[Version, Marker | None]]] = {}
    for line in lock.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==([^ ;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$", line)
        if match:
            name = re.sub(r"[-_.]+", "-", match[1]).lower()
            marker = Marker(match[3]) if match[3] else None
            pins.setdefault(name, []).append((Version(match[2]), marker))
    return pins


def _pinned_here(pins: list[tuple[Version, Marker | None]]) -> Version | None:
    """The version pinned for this interpreter and platform; None where the lock installs nothing here."""
    applicable = [version for version, marker in pins if marker is None or marker.evaluate()]
    assert len(applicable) <= 1, pins
    return applicable[0] if applicable else None


def _runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(line) for line in project["dependencies"]]


def test_every_lock_pins_every_runtime_dependency_within_its_declared_range() -> None:
    for lock in ("runtime.lock", "dev.lock", "floor.lock"):
        pins = _pins(REQUIREMENTS / lock)
        for requirement in _runtime_requirements():
            version = _pinned_here(pins[requirement.name.lower()])
            assert version is not None and requirement.specifier.contains(version), (
                f"{lock}: {requirement.name} {version}"
            )


def test_dev_lock_installs_the_runtime_lock_versions() -> None:
    """`make run` installs runtime.lock, `make test` dev.lock: the server under test is the one users run."""
    runtime, dev = _pins(REQUIREMENTS / "runtime.lock"), _pins(REQUIREMENTS / "dev.lock")
    for name, pins in runtime.items():
        assert _pinned_here(dev[name]) == _pinned_here(pins), name


def test_floor_lock_pins_exactly_the_declared_floors() -> None:
    pins = _pins(REQUIREMENTS / "floor.lock")
    for requirement in _runtime_requirements():
        floor = next(Version(spec.version) for spec in requirement.specifier if spec.operator == ">=")
        assert _pinned_here(pins[requirement.name.lower()]) == floor, requirement.name


def test_this_environment_is_exactly_a_lock() -> None:
    """The tests run on what a lock pins (dev.lock for `make test`, floor.lock for `make floor-test`)."""
    installed = {
        re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): Version(d.version) for d in metadata.distributions()
    }
    for requirement in _runtime_requirements():
        assert requirement.name.lower() in installed
    matches = []
    for lock in ("dev.lock", "floor.lock"):
        pins = _pins(REQUIREMENTS / lock)
        differences = {
            name: installed.get(name) for name, pin in pins.items() if installed.get(name) != _pinned_here(pin)
        }
        matches.append((lock, differences))
    assert any(not differences for _, differences in matches), matches


@pytest.mark.parametrize(
    ("path", "pattern"),
    [
        ("Dockerfile", r"pip install [^\n]*--require-hashes -r /tmp/runtime\.lock"),
        ("Dockerfile", r"pip install [^\n]*--no-deps /dist/\*\.whl"),
        ("Dockerfile", r"--require-hashes -r requirements/build\.lock"),
        ("Makefile", r"--require-hashes -r requirements/runtime\.lock -r requirements/build\.lock"),
        ("Makefile", r"--require-hashes -r requirements/dev\.lock"),
        ("Makefile", r"--no-deps --no-build-isolation -e \."),
    ],
)
def test_installers_use_the_locks(path: str, pattern: str) -> None:
    assert re.search(pattern, (ROOT / path).read_text()), f"{path} no longer installs from the lock: {pattern}"
