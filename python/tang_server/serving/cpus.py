"""How many CPUs this process may use: the default number of workers of `serve` and `tangd -l`.

The CPUs it may run on (its affinity: taskset, systemd's CPUAffinity=, a container's cpuset), capped by the CPU
time its cgroup may use (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` over `cpu.cfs_period_us`: a container's or a
Kubernetes pod's CPU limit, systemd's CPUQuota=) rounded up; never the host's count of CPUs. A quota set on an
ancestor of the process's cgroup caps it too, so the smallest one up to the root counts.

Imports only `os` and `pathlib`: `tangd` computes this too when it serves a connection itself, where every import
costs.
"""

from __future__ import annotations

import os
from pathlib import Path

TYPE_CHECKING = False  # typing's own costs an import (tangd's path); mypy treats this name the same
if TYPE_CHECKING:
    from collections.abc import Callable

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROCESS_CGROUPS = Path("/proc/self/cgroup")


def usable_cpus(cgroup_root: Path = CGROUP_ROOT, process_cgroups: Path = PROCESS_CGROUPS) -> int:
    """min(CPUs in the affinity, cgroup CPU quota rounded up), at least 1."""
    count = len(os.sched_getaffinity(0))
    limit = quota_cpus(cgroup_root, process_cgroups)
    return max(1, count if limit is None else min(count, limit))


def quota_cpus(cgroup_root: Path = CGROUP_ROOT, process_cgroups: Path = PROCESS_CGROUPS) -> int | None:
    """The CPU quota of the process's cgroup and its ancestors in whole CPUs, rounded up; None without one."""
    try:
        memberships = process_cgroups.read_text().splitlines()
    except OSError:
        return None
    v2_path = None
    for line in memberships:  # "ID:CONTROLLERS:PATH"
        _, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if "cpu" in controllers.split(","):  # v1 (or a hybrid host, where the cpu controller is v1's)
            mount = next((cgroup_root / name for name in (controllers, "cpu") if (cgroup_root / name).is_dir()), None)
            return None if mount is None else _smallest(mount, path, _v1_quota)
        if controllers == "":
            v2_path = path
    return None if v2_path is None else _smallest(cgroup_root, v2_path, _v2_quota)


def _smallest(mount: Path, path: str, read: Callable[[Path], int | None]) -> int | None:
    """The smallest quota from the cgroup at `path` up to the mount's root. Directories missing under the mount
    are skipped: in a container without its own cgroup namespace the path names the host's hierarchy, while the
    mount's root is the container's own cgroup."""
    relative = Path(path.lstrip("/"))
    quotas = [read(mount / directory) for directory in (relative, *relative.parents)]
    return min((quota for quota in quotas if quota is not None), default=None)


def _v2_quota(directory: Path) -> int | None:
    """`cpu.max`: "QUOTA PERIOD", or "max PERIOD" for none."""
    fields = _read(directory / "cpu.max").split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    return _whole_cpus(fields[0], fields[1])


def _v1_quota(directory: Path) -> int | None:
    """`cpu.cfs_quota_us` (-1 for none) over `cpu.cfs_period_us`."""
    return _whole_cpus(_read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us"))


def _whole_cpus(quota: str, period: str) -> int | None:
    """quota / period rounded up; None for no quota, or for anything unreadable (never a reason not to start)."""
    try:
        microseconds, per = int(quota), int(period)
    except ValueError:
        return None
    if microseconds <= 0 or per <= 0:
        return None
    return -(-microseconds // per)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
