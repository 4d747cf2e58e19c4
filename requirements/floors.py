"""The declared floor of every runtime dependency in pyproject.toml, the one source of the minimum versions.

    python floors.py PYPROJECT            print `name==floor` per dependency (`make lock` pins floor.lock to them)
    python floors.py --check PYPROJECT    exit 1 unless every dependency is installed at exactly its floor

`make floor-test` runs the check, then the Python tests, in the environment installed from floor.lock: a floor
raised in pyproject.toml without `make lock` fails there instead of passing untested.
"""

from __future__ import annotations

import importlib.metadata
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version


def floors(pyproject: Path) -> dict[str, Version]:
    found = {}
    for line in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        requirement = Requirement(line)
        lower = [spec.version for spec in requirement.specifier if spec.operator in (">=", "==")]
        if len(lower) != 1:
            sys.exit(f"{requirement.name}: declare exactly one lower bound (>=), the version that is tested")
        found[requirement.name] = Version(lower[0])
    return found


def main(arguments: list[str]) -> int:
    check = arguments[:1] == ["--check"]
    declared = floors(Path(arguments[-1]))
    if not check:
        print("\n".join(f"{name}=={version}" for name, version in declared.items()))
        return 0
    wrong = {
        name: installed
        for name, floor in declared.items()
        if (installed := Version(importlib.metadata.version(name))) != floor
    }
    for name, installed in wrong.items():
        print(f"{name} {installed} is installed, but the declared floor is {declared[name]}: run `make lock`")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
