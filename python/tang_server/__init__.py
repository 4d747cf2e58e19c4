"""A fast, wire-compatible Tang (NBDE) server."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tang-server")
except PackageNotFoundError:  # running from a source tree without an installed distribution
    __version__ = "0+unknown"
