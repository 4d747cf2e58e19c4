"""Every command that writes keys, interrupted at every file operation, by an injected crash and by SIGKILL.

For each command and each step N of its file operations on the key directory (see `crashpoint`), a fresh copy of
the directory is given to the command, which is stopped before step N: it exits at once, or it is held there and
killed with SIGKILL. Then:

- every key that existed is intact, byte for byte, under its own name or the one the command gives it;
- no half-written or orphaned file is loaded: every key file is a key that existed or one that the journal of the
  interrupted command writes (or the command had finished), and the loader sees exactly the key files;
- a visible signing key and a visible exchange key exist whenever they existed before;
- staged keys are a complete pair, or none, or belong to the interrupted command, which promote then finishes or
  names;
- running the same command again (for the server: starting again, or the next request) completes exactly it.

N runs from 0 until the command completes without being stopped, so every step was covered.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tang_server import cli
from tang_server.keys import jwk, keyfiles
from tang_server.keys.keyset import KeyKind, load_keyset
from tang_server.keys.keystore import KeyStore
from tang_server.serving import server
from tang_server.settings import Settings

from . import crashpoint

PAIR = sorted([KeyKind.SIGNING.value, KeyKind.EXCHANGE.value])


@dataclass
class Case:
    """One command on a prepared key directory, and what the directory must look like when it is done."""

    #: Runs the command in the process under test, on the key directory given.
    run: Callable[[Path], int]
    #: Every key file there before -> its name at the end (None: deleted).
    final: dict[str, str | None] = field(default_factory=dict)
    new_visible: bool = False
    new_staged: bool = False
    #: Where the key directory is under the run's root (first start creates it).
    keys: str = "keys"


def _cli(*words: str) -> Callable[[Path], int]:
    return lambda keys: cli.main([*words, str(keys)])


class _NotListening:
    """Stands for uvicorn in a first start: the test stops where listening would begin."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def run(self, sockets: object = None) -> None:
        pass


def _first_start(keys: Path) -> int:
    server.DrainingServer = _NotListening  # type: ignore[assignment,misc]  # in the child process only
    metrics = keys.parent.parent.parent / "metrics"  # outside the root: not a key directory operation
    # One worker: the stand-in above replaces the server in this process only; spawned workers would listen.
    server.serve(Settings(keys_dir=keys, metrics_dir=str(metrics), log_level="error", workers=1))
    return 0


def _request_time(keys: Path) -> int:
    """What a Tang request does when it finds no visible key (the general path; the direct path calls the same
    refresh): `KeyStore.current()` runs the generation in a thread."""
    store = KeyStore(keys, auto_keygen=True, recheck_seconds=3600)
    keyset = asyncio.run(store.current())
    return 0 if keyset.ready else 1


def _pair(keys: Path, prefix: str = "") -> list[str]:
    return [keyfiles.write_key(keys, prefix + keyfiles.key_file_name(k), k).name for k in keyfiles.generate_pair()]


def _hidden_pair(keys: Path) -> list[str]:
    return [path.name for path in (keys / name for name in _pair(keys, "."))]


def _same(names: list[str]) -> dict[str, str | None]:
    return {name: name for name in names}


def _prepare(command: str, keys: Path) -> Case:
    """The directory before `command`, and what it must be after."""
    if command == "first-start":
        return Case(_first_start, new_visible=True, keys="var/tang")
    keys.mkdir(parents=True)
    if command == "keygen":
        return Case(_cli("keygen"), new_visible=True)
    if command == "request-time":  # everything hidden, as after the vendor procedure's first step
        return Case(_request_time, _same(_hidden_pair(keys)), new_visible=True)
    visible, hidden = _pair(keys), _hidden_pair(keys)
    if command == "rotate":
        return Case(_cli("rotate"), {**_same(hidden), **{n: f".{n}" for n in visible}}, new_visible=True)
    if command == "stage":
        return Case(_cli("rotate", "--stage"), _same(visible + hidden), new_staged=True)
    if command == "promote":
        staged = _pair(keys, keyfiles.STAGED_PREFIX)
        final = {**_same(hidden), **{n: f".{n}" for n in visible}}
        final.update({n: n.removeprefix(keyfiles.STAGED_PREFIX) for n in staged})
        return Case(_cli("rotate", "--promote"), final)
    older = _hidden_pair(keys)
    staged = _pair(keys, keyfiles.STAGED_PREFIX)
    kept = _same(visible + staged)
    if command == "delete-hidden-all":
        return Case(_cli("delete-hidden", "--all"), {**kept, **dict.fromkeys(hidden + older)})
    assert command == "delete-hidden-kid"
    chosen = [hidden[0], older[1]]  # a signing key of one pair, the exchange key of another
    kids = [f"--kid={_kid(keys / n)}" for n in chosen]
    rest = [n for n in hidden + older if n not in chosen]
    return Case(_cli("delete-hidden", *kids), {**kept, **_same(rest), **dict.fromkeys(chosen)})


def _kid(path: Path) -> str:
    return jwk.thumbprint(json.loads(path.read_bytes()))


COMMANDS = [
    "keygen",
    "first-start",
    "request-time",
    "rotate",
    "stage",
    "promote",
    "delete-hidden-all",
    "delete-hidden-kid",
]


def _key_files(keys: Path) -> dict[str, bytes]:
    if not keys.is_dir():
        return {}
    return {p.name: p.read_bytes() for p in keys.iterdir() if p.name.endswith(".jwk")}


def check_interrupted(case: Case, before: dict[str, bytes], keys: Path) -> keyfiles.Plan | None:
    """The claims that hold at every instant. Returns the interrupted command's pending plan, if any."""
    after = _key_files(keys)
    plan = keyfiles.pending_plan(keys) if keys.is_dir() else None
    for name, content in before.items():  # intact, byte for byte, where it was or where it goes
        final = case.final[name]
        places = [after.get(name)] if final is None else [after.get(name), after.get(final)]
        assert content in places or (final is None and name not in after), f"{name} damaged or lost"
    loaded = load_keyset(keys).keys if keys.is_dir() else ()
    assert len(loaded) == len(after), "a key file the loader skips: half written"
    if _kinds(before, visible=True) == PAIR:
        assert sorted({k.kind.value for k in loaded if not k.hidden}) == PAIR, "no visible pair"
    staged = [k for k in loaded if k.name.startswith(keyfiles.STAGED_PREFIX)]
    if staged and sorted(k.kind.value for k in staged) != PAIR:
        assert plan is not None, "an incomplete staged pair that no pending command completes"
        _check_promote_sees(keys, plan)
    new = {name: content for name, content in after.items() if content not in before.values()}
    if plan is None and new:  # the journal goes last: new keys without it mean the command had finished
        check_final(case, before, keys)
        return None
    planned = _planned(plan) if plan else set()
    for name, content in new.items():
        assert content in planned, f"{name} is orphaned: no pending command writes it"
        assert stat.S_IMODE((keys / name).stat().st_mode) == keyfiles.KEY_FILE_MODE
    return plan


def _kinds(files: dict[str, bytes], *, visible: bool) -> list[str]:
    kinds = set()
    for name, content in files.items():
        if name.startswith(".") != visible:
            kinds.add(KeyKind.EXCHANGE.value if "deriveKey" in json.loads(content)["key_ops"] else "signing")
    return sorted(kinds)


def _check_promote_sees(keys: Path, plan: keyfiles.Plan) -> None:
    """An interrupted promote is finished by running it again (the re-run below); while another command is
    pending, promote refuses, names that command, and writes nothing."""
    if plan.command == "rotate --promote":
        return
    listing = sorted(os.listdir(keys))
    with pytest.raises(keyfiles.PendingCommand, match=f"`tang-server {plan.command} {keys}`"):
        keyfiles.promote(keys)
    assert sorted(os.listdir(keys)) == listing


def check_final(case: Case, before: dict[str, bytes], keys: Path, new_keys: set[bytes] | None = None) -> None:
    """Done: each old key where the command puts it, exactly one new pair (visible or staged), nothing else."""
    after = _key_files(keys)
    for name, content in before.items():
        final = case.final[name]
        if final is None:
            assert content not in after.values(), f"{name} not deleted"
        else:
            assert after.get(final) == content, f"{name} not at {final}"
    new = {name: content for name, content in after.items() if content not in before.values()}
    loaded = load_keyset(keys)
    assert len(loaded.keys) == len(after)
    added = [key for key in loaded.keys if key.name in new]
    assert sorted(k.kind.value for k in added if not k.hidden) == (PAIR if case.new_visible else [])
    staged = [k for k in added if k.name.startswith(keyfiles.STAGED_PREFIX)]
    assert sorted(k.kind.value for k in staged) == (PAIR if case.new_staged else [])
    assert len(added) == len(new)
    if new_keys is not None:
        assert set(new.values()) == new_keys, "the re-run did not complete the interrupted command's own pair"
    assert sorted(os.listdir(keys)) == sorted(after), "a journal or temporary file left behind"


@dataclass
class Sweep:
    steps: list[str]
    runs: int


def sweep(command: str, how: str, base: Path, plant: Callable[[], None] | None = None,
          violations: list[str] | None = None) -> Sweep:  # fmt: skip
    """Interrupt `command` at every step in turn; returns the steps of the uninterrupted run.

    With `violations`, a failed claim is recorded there and the sweep goes on to the next step.
    """
    template = base / "template"
    template.mkdir()
    case = _prepare(command, template / "keys")
    before = _key_files(template / case.keys)
    runs = 0
    for stop_at in range(1000):
        root = base / f"{how}{stop_at}"
        shutil.copytree(template, root, symlinks=True)
        keys = root / case.keys
        outcome = crashpoint.run(_planted(case.run, keys, plant), root, stop_at, how)
        runs += 1
        if outcome.status == "completed":
            assert len(outcome.steps) == stop_at, "completed although a step was still to be interrupted"
            check_final(case, before, keys)
            return Sweep(outcome.steps, runs)
        assert outcome.status == ("crashed" if how == "exit" else "killed"), (outcome.steps[-1:], outcome.output)
        assert outcome.last_step == stop_at
        try:
            runs += _finish(case, before, keys, root, plant)
        except AssertionError as exc:
            if violations is None:
                raise AssertionError(f"interrupted before step {outcome.steps[-1]}: {exc}") from exc
            violations.append(str(exc))
        shutil.rmtree(root)
    raise AssertionError("never completed")


def _finish(case: Case, before: dict[str, bytes], keys: Path, root: Path, plant: Callable[[], None] | None) -> int:
    """Check the interrupted state; unless the command had finished, run it again and check the end state.
    Returns the number of runs made."""
    plan = check_interrupted(case, before, keys)
    if plan is None and _key_files(keys) != before:
        return 0  # had finished (checked)
    again = crashpoint.run(_planted(case.run, keys, plant), root, None)
    assert again.status == "completed", again.output
    check_final(case, before, keys, None if plan is None else _planned(plan))
    return 1


def _planned(plan: keyfiles.Plan) -> set[bytes]:
    return {keyfiles.key_file_bytes(key) for _, key in plan.writes}


def _planted(run: Callable[[Path], int], keys: Path, plant: Callable[[], None] | None) -> Callable[[], int]:
    def target() -> int:
        if plant is not None:
            plant()  # in the child process only
        return run(keys)

    return target


#: Steps and runs per command and way of stopping, for the summary printed at the end of the module.
RESULTS: dict[tuple[str, str], Sweep] = {}


@pytest.fixture(scope="module", autouse=True)
def summary() -> Iterator[None]:
    yield
    for (command, how), result in sorted(RESULTS.items()):
        operations = " ".join(step.split()[1] for step in result.steps)
        print(f"\n{command} [{how}]: {len(result.steps)} steps, {result.runs} runs: {operations}")


@pytest.mark.parametrize("how", crashpoint.HOW)
@pytest.mark.parametrize("command", COMMANDS)
def test_interrupted_at_every_step(command: str, how: str, tmp_path: Path) -> None:
    result = sweep(command, how, tmp_path)
    RESULTS[(command, how)] = result
    assert len(result.steps) > 10


# The harness can fail: each planted mistake below is one the claims above must catch.


def _torn_write() -> None:
    """A key file written in place, in two halves (no temporary file, no link)."""

    real = keyfiles.write_new_file

    def write_new_file(directory: Path, name: str, data: bytes) -> Path:
        if not name.endswith(".jwk"):
            return real(directory, name, data)  # the journal stays right: the key files are the mistake
        fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, keyfiles.KEY_FILE_MODE)
        try:
            os.write(fd, data[: len(data) // 2])
            os.write(fd, data[len(data) // 2 :])
        finally:
            os.close(fd)
        return directory / name

    keyfiles.write_new_file = write_new_file


def _hide_first() -> None:
    """rotate hiding the old pair before the new one is written."""
    real = keyfiles._execute

    def execute(directory: Path, plan: keyfiles.Plan) -> None:
        real(directory, keyfiles.Plan(plan.command, renames=plan.renames))
        keyfiles.write_new_file(directory, keyfiles.JOURNAL, plan.encode())
        real(directory, keyfiles.Plan(plan.command, writes=plan.writes))

    keyfiles._execute = execute


def _stage_without_journal() -> None:
    """The stage of issue 12: two key files written one after the other, no journal."""

    def stage(directory: Path) -> list[Path]:
        with keyfiles.directory_lock(directory):
            pair = keyfiles.generate_pair()
            return [keyfiles.write_key(directory, keyfiles.STAGED_PREFIX + keyfiles.key_file_name(k), k) for k in pair]

    keyfiles.stage = stage


PLANTED: dict[str, tuple[str, Callable[[], None], str]] = {
    "torn write": ("keygen", _torn_write, "half written"),
    "old pair hidden first": ("rotate", _hide_first, "no visible pair"),
    "stage without journal": ("stage", _stage_without_journal, "incomplete staged pair"),
}


@pytest.mark.parametrize("mistake", PLANTED)
def test_the_harness_catches_a_planted_mistake(mistake: str, tmp_path: Path) -> None:
    command, plant, claim = PLANTED[mistake]
    violations: list[str] = []
    sweep(command, "exit", tmp_path, plant, violations)
    assert any(claim in violation for violation in violations), violations


def test_another_command_pending_is_named_and_finishing_it_unblocks(tmp_path: Path) -> None:
    """Killed just after the first staged key is linked: the lone `.staged.` key of issue 12, now with its journal.
    Other key commands refuse and name the command to run; running it finishes the same pair."""
    template, probe, base = tmp_path / "template", tmp_path / "probe", tmp_path / "run"
    case = _prepare("stage", template / "keys")
    before = _key_files(template / "keys")
    shutil.copytree(template, probe)
    steps = crashpoint.run(_planted(case.run, probe / "keys", None), probe, None).steps
    journal = next(int(s.split()[0]) for s in steps if s.split()[1] == "link" and s.endswith(keyfiles.JOURNAL))
    first_key = next(int(s.split()[0]) for s in steps[journal + 1 :] if s.split()[1] == "link")
    shutil.copytree(template, base)
    keys = base / "keys"
    assert crashpoint.run(_planted(case.run, keys, None), base, first_key + 1, "kill").status == "killed"
    assert len(keyfiles.staged_names(keys)) == 1
    named = f"`tang-server rotate --stage {keys}`"
    for words in (["rotate", "--promote"], ["delete-hidden", "--all"], ["keygen"], ["rotate"]):
        result = _tang_server(*words, str(keys))
        assert result.returncode == 1 and named in result.stderr, (words, result.stderr)
        assert "Traceback" not in result.stderr
    planned = _planned(keyfiles.pending_plan(keys))  # type: ignore[arg-type]
    finished = _tang_server("rotate", "--stage", str(keys))
    assert finished.returncode == 0 and "finishing the interrupted" in finished.stderr
    check_final(case, before, keys, planned)
    assert _tang_server("rotate", "--promote", str(keys)).returncode == 0


def _tang_server(*args: str) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).parent / "tang-server"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_a_lone_staged_key_left_by_an_older_version_is_refused_and_removable(keys: Path) -> None:
    """The state issue 12 found (a `.staged.` signing key alone): promote refuses it and says how to clear it."""
    signing, _ = keyfiles.generate_pair()
    lone = keyfiles.write_key(keys, keyfiles.STAGED_PREFIX + keyfiles.key_file_name(signing), signing)
    for words in (["rotate", "--promote"], ["rotate", "--stage"]):
        refused = _tang_server(*words, str(keys))
        assert refused.returncode == 1 and "delete-hidden --kid" in refused.stderr, refused.stderr
    assert _tang_server("delete-hidden", "--all", str(keys)).stdout.strip() == "no hidden keys to delete"
    removed = _tang_server("delete-hidden", f"--kid={jwk.thumbprint(signing)}", str(keys))
    assert removed.returncode == 0 and not lone.exists()
    assert _tang_server("rotate", "--stage", str(keys)).returncode == 0


def test_reading_the_directory_writes_nothing(tmp_path: Path) -> None:
    """Loading and reloading with auto_keygen on a directory without a visible key: not one step (the watcher and
    the periodic re-check only reload)."""
    keys = tmp_path / "keys"
    keys.mkdir()
    _hidden_pair(keys)

    def reload_only() -> int:
        store = KeyStore(keys, auto_keygen=True, recheck_seconds=3600)
        store.refresh(generate=False)
        with store._lock:  # what the watcher does: the periodic re-check, and a reload on events
            store._recheck_locked()
            store._reload_locked()
        return 0 if not store.keyset.visible else 1

    outcome = crashpoint.run(reload_only, tmp_path, 0)
    assert outcome.status == "completed" and outcome.steps == []


def test_python_m_crashpoint_stops_a_fresh_process_at_a_step(tmp_path: Path) -> None:
    """The harness also runs as `python -m tests.crashpoint`, in a process of its own."""
    keys, report = tmp_path / "keys", tmp_path.parent / f"{tmp_path.name}.steps"
    keys.mkdir()
    command = [sys.executable, "-m", "tests.crashpoint", str(tmp_path), "5", "exit", str(report), "--", "keygen",
               str(keys)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent.parent)
    assert result.returncode == crashpoint.CRASHED, result.stderr
    assert [line.split()[:2] for line in report.read_text().splitlines()] == [
        ["0", "mkdir"], ["1", "open"], ["2", "flock"], ["3", "open"], ["4", "fchmod"], ["5", "write"]
    ]  # fmt: skip
    assert _key_files(keys) == {}  # stopped while writing the journal: nothing is a key yet
    assert keyfiles.pending_plan(keys) is None
