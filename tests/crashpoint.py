"""Stop a process at exactly one file operation on a key directory: the crash-safety harness's test side.

Every os-level call that changes something under ROOT (a path argument there, or a descriptor opened there) is a
*step*, numbered from 0 in the order the process makes it: open, write, fsync, fdatasync, fchmod, fchown, chmod,
close, ftruncate, truncate, link, symlink, unlink, remove, rename, replace, mkdir, rmdir, and flock. Each step is
written to a report file before it runs. Step N itself never runs: the process then either exits at once (`os._exit`: an
injected crash) or stops itself (SIGSTOP) so that the test sees it held at exactly that step and kills it with a
real SIGKILL. Production code carries no hook: the wrappers replace `os` and `fcntl` functions in the process
under test only (a forked child, or `python -m tests.crashpoint`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Path-taking operations and how many of their leading arguments are paths.
PATH_OPERATIONS = {
    "open": 1,
    "chmod": 1,
    "truncate": 1,
    "link": 2,
    "unlink": 1,
    "remove": 1,
    "rename": 2,
    "replace": 2,
    "mkdir": 1,
    "rmdir": 1,
}
DESCRIPTOR_OPERATIONS = ("write", "fsync", "fdatasync", "fchmod", "fchown", "ftruncate", "close")

#: The exit status of an injected crash (any other status is a failure of the command itself).
CRASHED = 86

HOW = ("exit", "kill")

_real_write = os.write


class Crashpoint:
    """Counts the steps under `root` in this process and stops at `stop_at` (None: never)."""

    def __init__(self, root: Path, stop_at: int | None, how: str, report: int) -> None:
        self.root = os.path.abspath(root)
        self.stop_at = stop_at
        self.how = how
        self.report = report
        self.count = 0
        self.descriptors: dict[int, str] = {}  # open descriptors under root -> their path

    def install(self) -> None:
        for name, paths in PATH_OPERATIONS.items():
            setattr(os, name, self._path_wrapper(name, getattr(os, name), paths))
        for name in DESCRIPTOR_OPERATIONS:
            setattr(os, name, self._descriptor_wrapper(name, getattr(os, name)))
        os.symlink = self._symlink_wrapper(os.symlink)
        fcntl.flock = self._descriptor_wrapper("flock", fcntl.flock)

    def _under_root(self, path: Any) -> str | None:
        if isinstance(path, int):
            return None
        absolute = os.path.abspath(os.fsdecode(path))
        if absolute == self.root or absolute.startswith(self.root + os.sep):
            return os.path.relpath(absolute, self.root)
        return None

    def _step(self, operation: str, target: str) -> None:
        index = self.count
        self.count += 1
        _real_write(self.report, f"{index} {operation} {target}\n".encode())
        if index != self.stop_at:
            return
        if self.how == "exit":
            os._exit(CRASHED)
        # Directed at this thread, so that this thread is the one that stops before its next instruction (sent
        # to the process, another thread may take it while this one runs on). The whole process stops.
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)  # held here until the test's SIGKILL
        os._exit(CRASHED + 1)  # never reached: continuing would be a harness bug, and fails the test

    def _path_wrapper(self, name: str, real: Callable[..., Any], paths: int) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            targets = [t for t in (self._under_root(arg) for arg in args[:paths]) if t is not None]
            if not targets:
                return real(*args, **kwargs)
            self._step(name, " ".join(targets))
            result = real(*args, **kwargs)
            if name == "open":
                self.descriptors[result] = targets[0]
            return result

        return wrapper

    def _symlink_wrapper(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(source: Any, destination: Any, *args: Any, **kwargs: Any) -> Any:
            target = self._under_root(destination)
            if target is not None:
                self._step("symlink", target)
            return real(source, destination, *args, **kwargs)

        return wrapper

    def _descriptor_wrapper(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(fd: Any, *args: Any, **kwargs: Any) -> Any:
            number = fd if isinstance(fd, int) else fd.fileno()
            target = self.descriptors.get(number)
            if target is None:
                return real(fd, *args, **kwargs)
            self._step(name, target)
            if name == "close":
                del self.descriptors[number]
            return real(fd, *args, **kwargs)

        return wrapper


@dataclass
class Outcome:
    #: "completed" (exit 0), "crashed" (injected), "killed" (SIGKILL while held), or "failed" (anything else).
    status: str
    #: The steps it made (or was held at), as "index operation target".
    steps: list[str]
    output: str

    @property
    def last_step(self) -> int | None:
        return int(self.steps[-1].split()[0]) if self.steps else None


def run(target: Callable[[], int], root: Path, stop_at: int | None, how: str = "exit") -> Outcome:
    """Run `target` in a forked child counting the steps under `root`, stopped before step `stop_at`."""
    assert how in HOW
    with tempfile.TemporaryDirectory(prefix="crashpoint-") as scratch:
        report_path, output_path = Path(scratch, "steps"), Path(scratch, "output")
        report = os.open(report_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        output = os.open(output_path, os.O_WRONLY | os.O_CREAT, 0o600)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(target, root, stop_at, how, report, output)
        os.close(report)
        os.close(output)
        status = _wait(pid, stop_at, how, report_path)
        steps = report_path.read_text().splitlines()
        return Outcome(status, steps, output_path.read_text(errors="replace"))


def _child(target: Callable[[], int], root: Path, stop_at: int | None, how: str, report: int, output: int) -> None:
    code = 1
    try:
        os.dup2(output, 1)
        os.dup2(output, 2)
        Crashpoint(root, stop_at, how, report).install()
        code = target()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _wait(pid: int, stop_at: int | None, how: str, report_path: Path) -> str:
    _, status = os.waitpid(pid, os.WUNTRACED)
    if os.WIFSTOPPED(status):
        assert how == "kill", "stopped without being asked to"
        _assert_held_at(pid, stop_at, report_path)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        return "killed"
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return "completed"
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == CRASHED and how == "exit":
        return "crashed"
    return f"failed (wait status {status:#x})"


def _assert_held_at(pid: int, stop_at: int | None, report_path: Path) -> None:
    """The child is stopped (state T in /proc), and the last step it reported is exactly the one asked for."""
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    assert state == "T", f"child {pid} in state {state}, not stopped"
    steps = report_path.read_text().splitlines()
    assert steps and int(steps[-1].split()[0]) == stop_at, (stop_at, steps[-1:])


def main(argv: list[str]) -> int:
    """`python -m tests.crashpoint ROOT STOP_AT exit|kill REPORT -- tang-server arguments...`

    STOP_AT -1 never stops; the steps are appended to the file REPORT.
    """
    root, stop_at, how, report, separator, *command = argv
    assert separator == "--" and how in HOW
    fd = os.open(report, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    Crashpoint(Path(root), None if int(stop_at) < 0 else int(stop_at), how, fd).install()
    from tang_server import cli

    return cli.main(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
