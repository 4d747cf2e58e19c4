"""Capacity planning: how many unlocks per second a replica gives, and how many replicas a fleet needs.

    python bench/capacity.py [--seconds 5] [--max-workers N] [--output-dir bench/results/capacity]

Measures, on this machine, `/rec` throughput and p99 latency against the number of worker processes (kept-alive
and new connections), then latency against offered load for one worker (paced wrk connections at fractions of
the measured saturation). Writes `report.md` with the tables, two PNG charts and the calculator's inputs.

The calculator alone (no measurement), for a fleet of N machines that must all unlock within T seconds:

    python bench/capacity.py plan --machines 20000 --seconds 120 --rate 2600 [--devices 1] [--headroom 0.5]

Run the measurement on the hardware the replicas will run on: the numbers here are this machine's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from load import HERE, free_port, prepare_keys, serve_command, started


def plan(machines: int, seconds: float, rate: float, devices: int = 1, headroom: float = 0.5) -> dict[str, float]:
    """Replicas needed so that `machines` x `devices` recoveries finish within `seconds`.

    Each bound LUKS device costs one `POST /rec` at boot (clevis does not fetch `/adv` to unlock). `rate` is one
    replica's measured saturation throughput; `headroom` is the fraction of it planned for (latency stays low well
    below saturation; at saturation it grows without bound). One more replica covers the loss of one.
    """
    demand = machines * devices / seconds
    usable = rate * headroom
    needed = max(1, math.ceil(demand / usable))
    return {"demand_per_second": demand, "usable_per_replica": usable, "replicas": needed + 1}


def wrk_json(
    url: str, body: Path, seconds: int, connections: int, load_cpus: str, *, close: bool = False, delay_ms: float = 0.0
) -> dict[str, float]:
    env = {
        **os.environ,
        "WRK_BODY_FILE": str(body),
        "WRK_CLOSE": "1" if close else "0",
        "WRK_DELAY_MS": f"{delay_ms:.3f}",
    }
    command = [
        "taskset",
        "-c",
        load_cpus,
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "-s",
        str(HERE / "wrk_report.lua"),
        url,
    ]
    output = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    line = next(line for line in output.splitlines() if line.startswith("WRK_JSON "))
    summary = dict(json.loads(line.removeprefix("WRK_JSON ")))
    summary["rps"] = summary["requests"] / (summary["duration_us"] / 1e6)
    return summary


def measure(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cpus = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="tang-capacity-"))
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    try:
        keys, path, body = prepare_keys(work)
        by_workers = []
        for workers in range(1, args.max_workers + 1):
            port = free_port()
            command = serve_command(keys, port, workers)
            server_cpus = "1" if cpus > 1 and workers == 1 else f"0-{cpus - 1}"
            load_cpus = "0" if cpus > 1 and workers == 1 else f"0-{cpus - 1}"
            with started(command, port, server_cpus):
                url = f"http://127.0.0.1:{port}{path}"
                kept = wrk_json(url, body, args.seconds, 16 * workers, load_cpus)
                new = wrk_json(url, body, args.seconds, 16 * workers, load_cpus, close=True)
                row = {
                    "workers": workers,
                    "kept_rps": kept["rps"],
                    "kept_p99_ms": kept["p99_us"] / 1000,
                    "new_rps": new["rps"],
                    "new_p99_ms": new["p99_us"] / 1000,
                }
                by_workers.append(row)
                print(row, flush=True)
                if workers == 1:
                    saturation = kept["rps"]
                    offered = []
                    connections = 16
                    for fraction in (0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.2):
                        # Each connection's pause so that all together offer `fraction` of saturation.
                        delay = max(0.0, connections * 1000 / (fraction * saturation) - 1000 / saturation)
                        paced = wrk_json(url, body, args.seconds, connections, load_cpus, delay_ms=delay)
                        offered.append(
                            {
                                "fraction": fraction,
                                "offered_rps": fraction * saturation,
                                "achieved_rps": paced["rps"],
                                "p50_ms": paced["p50_us"] / 1000,
                                "p99_ms": paced["p99_us"] / 1000,
                            }
                        )
                        print(offered[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    figure, axis = plt.subplots(figsize=(7, 4))
    counts = [r["workers"] for r in by_workers]
    axis.plot(counts, [r["kept_rps"] for r in by_workers], "o-", label="req/s, kept-alive")
    axis.plot(counts, [r["new_rps"] for r in by_workers], "s-", label="req/s, new connection")
    axis.set_xlabel("worker processes")
    axis.set_ylabel("/rec requests per second")
    axis.set_xticks(counts)
    twin = axis.twinx()
    twin.plot(counts, [r["kept_p99_ms"] for r in by_workers], "o--", color="grey", label="p99 ms, kept-alive")
    twin.set_ylabel("p99 latency (ms) at saturation")
    axis.legend(loc="upper left")
    twin.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(out / "throughput_by_workers.png", dpi=100)

    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot([o["offered_rps"] for o in offered], [o["p50_ms"] for o in offered], "o-", label="p50")
    axis.plot([o["offered_rps"] for o in offered], [o["p99_ms"] for o in offered], "s-", label="p99")
    axis.set_xlabel("offered /rec requests per second (one worker)")
    axis.set_ylabel("latency (ms)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "latency_by_offered_load.png", dpi=100)

    best = max(r["kept_rps"] for r in by_workers)
    at_80 = next(o for o in offered if o["fraction"] == 0.8)
    example = plan(20000, 120, best)
    lines = [
        "# Capacity report",
        "",
        f"Machine: {cpus} CPUs (`nproc`); measured with wrk on loopback, {args.seconds} s per point.",
        "",
        "## /rec throughput by worker processes",
        "",
        "| workers | req/s kept-alive | p99 ms | req/s new connection | p99 ms |",
        "|---|---|---|---|---|",
        *[
            f"| {r['workers']} | {r['kept_rps']:.0f} | {r['kept_p99_ms']:.2f} | {r['new_rps']:.0f} | "
            f"{r['new_p99_ms']:.2f} |"
            for r in by_workers
        ],
        "",
        "![throughput](throughput_by_workers.png)",
        "",
        "## Latency against offered load (one worker, kept-alive, paced connections)",
        "",
        "| offered | offered req/s | achieved req/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|",
        *[
            f"| {o['fraction']:.0%} | {o['offered_rps']:.0f} | {o['achieved_rps']:.0f} | {o['p50_ms']:.2f} | "
            f"{o['p99_ms']:.2f} |"
            for o in offered
        ],
        "",
        f"p99 at 80% of saturation: {at_80['p99_ms']:.2f} ms.",
        "",
        "![latency](latency_by_offered_load.png)",
        "",
        "## Planning",
        "",
        "Each bound LUKS device costs one `POST /rec` at boot. With a replica of this size saturating at "
        f"{best:.0f} req/s and planning for half of it, 20,000 machines unlocking within 120 s need "
        f"{example['demand_per_second']:.0f} req/s, that is {example['replicas']} replicas (one spare included).",
        "",
        "`python bench/capacity.py plan --machines N --seconds T --rate R` computes it for your fleet.",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "capacity.json").write_text(json.dumps({"by_workers": by_workers, "offered": offered}, indent=2))
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    calculator = commands.add_parser("plan", help="replicas needed for a fleet, from a measured rate")
    calculator.add_argument("--machines", type=int, required=True)
    calculator.add_argument("--seconds", type=float, required=True, help="time budget for every unlock")
    calculator.add_argument("--rate", type=float, required=True, help="one replica's measured /rec req/s")
    calculator.add_argument("--devices", type=int, default=1, help="bound LUKS devices per machine")
    calculator.add_argument("--headroom", type=float, default=0.5, help="fraction of saturation to plan for")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--max-workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--output-dir", type=Path, default=HERE / "results" / "capacity")
    args = parser.parse_args(argv)
    if args.command == "plan":
        result = plan(args.machines, args.seconds, args.rate, args.devices, args.headroom)
        print(
            f"demand: {result['demand_per_second']:.0f} /rec per second; "
            f"one replica at {args.headroom:.0%} of {args.rate:.0f}/s gives {result['usable_per_replica']:.0f}; "
            f"replicas: {result['replicas']} (one spare included)"
        )
        return 0
    return measure(args)


if __name__ == "__main__":
    sys.exit(main())
