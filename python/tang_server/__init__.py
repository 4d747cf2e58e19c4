"""A fast, wire-compatible Tang (NBDE) server."""

from __future__ import annotations


def __getattr__(name: str) -> str:
    # Computed on first use: importlib.metadata costs more than `tangd`'s whole hand-over of a connection.
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tang-server")
    except PackageNotFoundError:  # running from a source tree without an installed distribution
        return "0+unknown"
