"""`tangd`: the reference server's command line, so unit files, containers and scripts keep working.

    tangd [-l] [-p PORT] [-e ENDPOINT] DIR     (options may also follow DIR)

Without `-l` it serves the one HTTP connection on standard input and output (systemd `Accept=yes`, xinetd,
socat); with `-l` it listens on PORT (default 9090) on every address, as the reference does.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import server
from .cli import port_number
from .settings import Settings

DEFAULT_PORT = 9090


def parser() -> argparse.ArgumentParser:
    tangd = argparse.ArgumentParser(prog="tangd", description="Tang server (reference-compatible command line)")
    tangd.add_argument("-l", dest="listen", action="store_true", help="listen on PORT instead of serving stdin")
    tangd.add_argument("-p", dest="port", type=port_number, default=DEFAULT_PORT, help="port (default 9090)")
    tangd.add_argument("-e", dest="endpoint", default="", help="serve under /ENDPOINT")
    tangd.add_argument("directory", type=Path, help="the key directory")
    return tangd


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    if not args.directory.is_dir():
        print(f"Error calling stat() on path: {args.directory}: not a directory", file=sys.stderr)
        return 1
    settings = Settings(
        keys_dir=args.directory,
        host="0.0.0.0",  # noqa: S104 - the reference binds every address
        port=args.port,
        prefix=args.endpoint,
    )
    if args.listen:
        server.serve(settings)
    else:
        server.serve_connection(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
