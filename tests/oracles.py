"""Expectations computed by tools other than ours: thumbprints by `jose`, the key-set digest from its definition."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path


def jose_thumbprint(key: dict[str, object], hash_name: str = "S256") -> str:
    result = subprocess.run(["jose", "jwk", "thp", "-i-", "-a", hash_name], input=json.dumps(key).encode(),
                            capture_output=True, check=True, timeout=30)  # fmt: skip
    return result.stdout.decode().strip()


def key_files(directory: Path) -> dict[str, dict[str, object]]:
    """Every `*.jwk` file of a directory, parsed, by name."""
    return {path.name: json.loads(path.read_text()) for path in sorted(directory.glob("*.jwk"))}


def kids(directory: Path) -> dict[str, set[str]]:
    """The S256 key ids (by jose) of the visible and of the hidden keys of a directory."""
    found: dict[str, set[str]] = {"visible": set(), "hidden": set()}
    for name, key in key_files(directory).items():
        found["hidden" if name.startswith(".") else "visible"].add(jose_thumbprint(key))
    return found


def digest(directory: Path) -> str:
    """SHA-256 over the sorted lines `visible KID` / `hidden KID` (the key-set digest as `keyset.py` defines it)."""
    lines = sorted(f"{visibility} {kid}\n" for visibility, ids in kids(directory).items() for kid in ids)
    return hashlib.sha256("".join(lines).encode()).hexdigest()
