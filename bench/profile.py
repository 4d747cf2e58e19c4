"""Where a worker's CPU goes, per route and connection mode: py-spy samples of our server under wrk.

    python bench/profile.py [--samples 2000] [--rate 250] [--connections 16] [--rows adv:kept-alive,...]
                            [--output bench/results/profile.json] [--serve-args=--no-access-log]

One worker (one process) pinned to the server CPU, wrk on the load CPU, the same keys and client as `load.py`.
For each of /adv and /rec, kept-alive and with a new connection per request, py-spy samples the worker's Python
stacks (it stops the process for each sample, so every stack is whole) and the report gives each part of the
request path as a share of the samples of the event loop thread and of the key-usage thread (at least
`--samples` of them per row, in as many passes of `--seconds` as that takes): a ratio within one process and one
run, which a noisy neighbour moves far less than a throughput. "event loop and kernel" are samples with no
Python frame below the event loop: uvloop's C code, the system calls and the kernel's TCP work (accept, read,
write, close).

The shares are of the worker's CPU; a part's cost per request is its share times the CPU per request `load.py`
reports. The top functions by inclusive share follow, for what the groups do not name.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from load import BIN, HERE, free_port, prepare_keys, serve_command, started, wrk

#: The parts of the request path, each recognised by the functions (py-spy's "name (file:line)" frames) it runs.
GROUPS: dict[str, re.Pattern[str]] = {
    "access log": re.compile(r"^AccessLog\."),
    "metrics": re.compile(r"^Metrics\.|\(prometheus_client/"),
    "recovery: validation and the P-521 multiplication": re.compile(r"\(tang_server/keys/recovery\.py\)$"),
    "HTTP parsing (httptools callbacks)": re.compile(r"^TangHttpProtocol\.on_|^HttpToolsProtocol\.on_"),
    "connection set-up and teardown": re.compile(r"\.connection_made \(|\.connection_lost \(|_start_deadline|_closing"),
    "answer (route, key set, headers)": re.compile(r"^TangApplication\.(answer|_advertisement|_recovery|refusal) \("),
    "key usage and the ledger": re.compile(r"\(tang_server/ops/(usage|ledger|distinct)\.py\)$"),
}
#: The one background thread whose work each request causes (it merges the requests' usage and writes the ledger):
#: its samples count, as they hold the interpreter the event loop needs.
USAGE_THREAD = re.compile(r"^Usage\._run \(")
#: py-spy reports a thread waiting for its timer as active; these innermost frames mean it is waiting.
IDLE = re.compile(r"^(Condition|Event)\.wait \(threading\.py\)$")
LOOP_ONLY = "event loop and kernel"


def profile(pid: int, seconds: float, rate: int, output: Path) -> None:
    command = [str(BIN / "py-spy"), "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
               "--rate", str(rate), "--format", "raw", "--output", str(output)]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)


def shares(raw: str) -> tuple[int, dict[str, float], list[tuple[str, float]]]:
    """Samples, the share of each group (and of samples with no frame below the event loop), the top functions."""
    total = 0
    groups: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    for line in filter(None, raw.splitlines()):
        stack, _, count = line.rpartition(" ")
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        if frames[0].startswith("Thread._bootstrap (") and (
            not any(USAGE_THREAD.search(frame) for frame in frames) or IDLE.search(frames[-1])
        ):
            continue  # the key watcher's thread (it works only when the directory changes), or a thread waiting
        samples = int(count)
        total += samples
        if frames[-1].startswith("Runner.run ("):
            groups[LOOP_ONLY] += samples
        for name, pattern in GROUPS.items():
            if any(pattern.search(frame) for frame in frames):
                groups[name] += samples
        for frame in set(frames):
            functions[frame] += samples
    total = max(total, 1)
    percent = {name: 100 * groups[name] / total for name in (*GROUPS, LOOP_ONLY)}
    outer = {frame for frame, count in functions.items() if count == max(functions.values())}  # main, run, ...
    top = [(frame, 100 * count / total) for frame, count in functions.most_common(40) if frame not in outer][:20]
    return total, percent, top


ROWS = ("adv:kept-alive", "adv:new", "rec:kept-alive", "rec:new")


def sampled(pid: int, url: str, payload: Path | None, close: bool, args: argparse.Namespace, work: Path) -> str:
    """py-spy's raw samples of the worker under wrk, passes of `--seconds` until the event loop thread has
    `--samples` of them (a busy machine leaves the worker idle, waiting for wrk, for more of each pass)."""
    passes: list[str] = []
    for number in range(args.max_passes):
        wanted = {"seconds": args.seconds + 2, "connections": args.connections, "cpus": args.load_cpus,
                  "body": payload, "close": close}  # fmt: skip
        # wrk runs longer than the sampling, which starts once the load is on.
        load = threading.Thread(target=wrk, args=(url,), kwargs=wanted)
        load.start()
        time.sleep(1)
        output = work / f"pass-{number}.txt"
        profile(pid, args.seconds, args.rate, output)
        load.join()
        passes.append(output.read_text())
        if shares("\n".join(passes))[0] >= args.samples:
            break
    return "\n".join(passes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="sampling time per pass")
    parser.add_argument("--samples", type=int, default=2000, help="samples per row, at least")
    parser.add_argument("--max-passes", type=int, default=50, help="passes per row, at most (bounds a hang)")
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rows", default=",".join(ROWS), help="route:connection rows to profile")
    parser.add_argument("--server-cpus", default="1", help="taskset CPU list for the server")
    parser.add_argument("--load-cpus", default="0", help="taskset CPU list for wrk")
    parser.add_argument("--serve-args", default="", help="extra `serve` arguments, e.g. --no-access-log")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "profile.json")
    args = parser.parse_args(argv)
    rows = args.rows.split(",")
    if not set(rows) <= set(ROWS):
        parser.error(f"rows are among {', '.join(ROWS)}")

    work = Path(tempfile.mkdtemp(prefix="tang-profile-"))
    report: list[dict[str, object]] = []
    try:
        keys, rec_path, body = prepare_keys(work)
        port = free_port()
        command = serve_command(keys, port, 1, *shlex.split(args.serve_args))
        with started(command, port, args.server_cpus) as server:
            for row in rows:
                route, _, connection = row.partition(":")
                path, payload = ("/adv", None) if route == "adv" else (rec_path, body)
                raw = sampled(server.pid, f"http://127.0.0.1:{port}{path}", payload, connection == "new", args, work)
                total, percent, top = shares(raw)
                report.append({"route": route, "connection": connection, "samples": total, "groups": percent,
                               "top": top})  # fmt: skip
                print(f"\n{route} {connection}: {total} samples", flush=True)
                for name, value in percent.items():
                    print(f"  {value:5.1f}%  {name}")
                print("  top functions (inclusive):")
                for frame, value in top[:12]:
                    print(f"  {value:5.1f}%  {frame}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"serve_args": args.serve_args, "profiles": report}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
