"""The default number of workers: one per CPU the process may use (affinity, cgroup CPU quota), not the host's.

The cgroup quota is read from fake cgroup trees (v2, v1, hybrid, none); the affinity is set by `taskset` on a real
process, and the oracle is the CPU list given to taskset. End to end, `serve` and `tangd -l` under taskset start
as many serving processes as CPUs they were given.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from tang_server.serving import cpus

from .listening import worker_pids
from .support import BIN, request, require_tools, running_on_free_port

AFFINITY = len(os.sched_getaffinity(0))


def cgroup_tree(root: Path, memberships: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A cgroup mount at `root` with `files` (path: content) and a /proc/self/cgroup with `memberships`."""
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content + "\n")
    root.mkdir(exist_ok=True)
    process = root.parent / "proc-self-cgroup"
    process.write_text(memberships)
    return root, process


V2 = "0::/system.slice/tang.service\n"
V1 = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n"


@pytest.mark.parametrize(
    ("memberships", "files", "expected"),
    [
        pytest.param(V2, {"system.slice/tang.service/cpu.max": "150000 100000"}, 2, id="v2-quota-rounded-up"),
        pytest.param(V2, {"system.slice/tang.service/cpu.max": "50000 100000"}, 1, id="v2-below-one-cpu"),
        pytest.param(V2, {"system.slice/tang.service/cpu.max": "400000 100000"}, 4, id="v2-whole"),
        pytest.param(V2, {"system.slice/tang.service/cpu.max": "max 100000"}, None, id="v2-max"),
        pytest.param(
            V2,
            {"system.slice/cpu.max": "100000 100000", "system.slice/tang.service/cpu.max": "max 100000"},
            1,
            id="v2-ancestor-caps",
        ),
        pytest.param("0::/\n", {"cpu.max": "300000 100000"}, 3, id="v2-container-namespace"),
        pytest.param("0::/kubepods/pod1/abc\n", {"cpu.max": "200000 100000"}, 2, id="v2-container-host-path"),
        pytest.param(V2, {}, None, id="v2-no-file"),
        pytest.param(
            V1,
            {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "250000", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"},
            3,
            id="v1-quota",
        ),
        pytest.param(
            V1,
            {"cpu/docker/abc/cpu.cfs_quota_us": "100000", "cpu/docker/abc/cpu.cfs_period_us": "100000"},
            1,
            id="v1-mounted-as-cpu",
        ),
        pytest.param(
            V1, {"cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000"}, None, id="v1-none"
        ),
        pytest.param(
            "4:cpu:/\n0::/\n",
            {"cpu/cpu.cfs_quota_us": "200000", "cpu/cpu.cfs_period_us": "100000", "cpu.max": "100000 100000"},
            2,
            id="hybrid-v1-cpu-controller",
        ),
        pytest.param(V2, {"system.slice/tang.service/cpu.max": "lots 100000"}, None, id="unreadable-is-none"),
        pytest.param("", {"cpu.max": "100000 100000"}, None, id="no-cgroup"),
    ],
)
def test_quota_from_a_cgroup_tree(tmp_path: Path, memberships: str, files: dict[str, str], expected: int) -> None:
    root, process = cgroup_tree(tmp_path / "cgroup", memberships, files)
    assert cpus.quota_cpus(root, process) == expected
    assert cpus.usable_cpus(root, process) == (AFFINITY if expected is None else min(AFFINITY, expected))


def test_no_proc_file_means_no_quota(tmp_path: Path) -> None:
    assert cpus.quota_cpus(tmp_path, tmp_path / "missing") is None
    assert cpus.usable_cpus(tmp_path, tmp_path / "missing") == AFFINITY


def _cpu_lists() -> list[str]:
    """CPU lists for taskset that this process may use and the cgroup quota does not cut (else they are skipped)."""
    allowed = sorted(os.sched_getaffinity(0))
    most = min(len(allowed), cpus.quota_cpus() or len(allowed))
    return [",".join(map(str, allowed[:count])) for count in (1, 2) if count <= most]


def _pinned(cpu_list: str) -> list[str]:
    require_tools("taskset")
    return ["taskset", "-c", cpu_list]


PRINT_DEFAULTS = """
from pathlib import Path
from tang_server import tangd
from tang_server.settings import Settings
print(Settings(keys_dir=Path(".")).workers, tangd.settings(".", "").workers)
"""


@pytest.mark.parametrize("cpu_list", _cpu_lists())
def test_default_workers_follow_the_affinity_taskset_gives(cpu_list: str) -> None:
    given = len(cpu_list.split(","))
    shown = subprocess.run([*_pinned(cpu_list), sys.executable, "-c", PRINT_DEFAULTS], capture_output=True,
                           text=True, check=True)  # fmt: skip
    assert shown.stdout.split() == [str(given), str(given)]
    helped = subprocess.run([*_pinned(cpu_list), str(BIN / "tang-server"), "serve", "--help"], capture_output=True,
                            text=True, check=True)  # fmt: skip
    assert f"(here: {given})" in " ".join(helped.stdout.split())


def _serving_processes(pid: int) -> int:
    """Serving processes of a server: its workers, or the server itself when it has none."""
    return len(worker_pids(pid)) or 1


@pytest.mark.parametrize("cpu_list", _cpu_lists())
@pytest.mark.parametrize("program", ["serve", "tangd -l"])
def test_a_server_without_workers_option_starts_one_worker_per_cpu_given(
    keys: Path, tmp_path: Path, cpu_list: str, program: str
) -> None:
    def command(port: int) -> Sequence[str]:
        if program == "serve":
            return [*_pinned(cpu_list), str(BIN / "tang-server"), "serve", "--keys-dir", str(keys), "--port", str(port)]
        return [*_pinned(cpu_list), str(BIN / "tangd"), "-l", "-p", str(port), str(keys)]

    given = len(cpu_list.split(","))
    with running_on_free_port(command, tmp_path / "log") as server:
        deadline = time.monotonic() + 30
        while request(server.port, "GET", "/readyz").status != 200 or _serving_processes(server.process.pid) < given:
            assert time.monotonic() < deadline, server.log_text()
            time.sleep(0.1)
        time.sleep(0.5)  # none more comes
        assert _serving_processes(server.process.pid) == given
        assert request(server.port, "GET", "/adv").status == 200
