"""Soak: a long, bounded run of mixed traffic, reporting each worker's memory at start and end.

    python bench/soak.py [--minutes 3] [--workers 2] [--output bench/results/soak.json]

Drives `/rec` (kept-alive and new connections), `/adv` and error paths with wrk for the whole duration, samples
the resident set size (RSS) of every worker process each 10 seconds, and reports start, end and growth. Memory is
judged after a warm-up: the first sample is taken once traffic has run for 20 seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from load import HERE, free_port, prepare_keys, serve_command, started


def worker_rss(parent: int) -> dict[int, int]:
    """RSS in KiB of each worker: the uvicorn parent's children, or the server itself when it runs one worker
    (then uvicorn serves in the parent process)."""
    sizes = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        try:
            command = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if b"resource_tracker" in command:  # multiprocessing's helper, not a worker
            continue
        if int(fields.get("PPid", "0").strip()) == parent or int(entry) == parent:
            sizes[int(entry)] = int(fields["VmRSS"].split()[0])
    if len(sizes) > 1:
        del sizes[parent]  # the supervisor, not a worker
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "soak.json")
    args = parser.parse_args(argv)
    seconds = int(args.minutes * 60)
    work = Path(tempfile.mkdtemp(prefix="tang-soak-"))
    keys, rec_path, body = prepare_keys(work)
    bad = work / "bad.json"
    bad.write_text('{"kty":"EC","crv":"P-521","x":"AAAA","y":"AAAA"}')
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    rec = base + rec_path
    command = serve_command(keys, port, args.workers, "--no-access-log")
    loads = [
        (rec, body, False),
        (rec, body, True),
        (f"{base}/adv", None, False),
        (rec, bad, False),
        (f"{base}/nope", None, True),
    ]
    samples: list[dict[str, object]] = []
    with started(command, port, f"0-{(os.cpu_count() or 1) - 1}") as server:

        def drive(url: str, payload: Path | None, close: bool) -> None:
            env = {**os.environ, "WRK_BODY_FILE": str(payload or ""), "WRK_CLOSE": "1" if close else "0"}
            subprocess.run(
                ["wrk", "-t1", "-c4", f"-d{seconds}s", "-s", str(HERE / "wrk_report.lua"), url],
                env=env,
                capture_output=True,
                check=True,
            )

        threads = [threading.Thread(target=drive, args=load) for load in loads]
        for thread in threads:
            thread.start()
        started_at = time.monotonic()
        time.sleep(min(20, seconds / 4))
        while time.monotonic() - started_at < seconds - 5:
            samples.append({"t": round(time.monotonic() - started_at), "rss_kib": worker_rss(server.pid)})
            print(samples[-1], flush=True)
            time.sleep(10)
        samples.append({"t": round(time.monotonic() - started_at), "rss_kib": worker_rss(server.pid)})
        for thread in threads:
            thread.join()
    first, last = samples[0]["rss_kib"], samples[-1]["rss_kib"]
    assert isinstance(first, dict) and isinstance(last, dict)
    growth = {pid: last[pid] - first[pid] for pid in first if pid in last}
    report = {"minutes": args.minutes, "workers": args.workers, "samples": samples, "growth_kib": growth}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    for pid in first:
        print(
            f"worker {pid}: {first[pid]} KiB after warm-up -> {last.get(pid)} KiB at the end "
            f"({growth.get(pid, 0):+d} KiB)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
