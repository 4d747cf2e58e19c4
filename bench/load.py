"""Load harness: our server, its peers (the reference C server, tangy) and the two ceilings, measured by wrk in one run.

    python bench/load.py [--seconds 5] [--connections 16] [--workers 1] [--output bench/results/load.json]
                         [--baseline DIR] [--variant NAME=ARGS]... [--peers reference,tangy,constant]

`--baseline DIR` also measures another version of our server, DIR holding its `tang_server` package (for
example `git archive REV python | tar -x -C DIR`, plus the built `_native*.so`), right after ours on the same
keys and CPUs, to compare a change before and after in one run. `--variant NAME=ARGS` measures our server again
with extra `serve` arguments (`{work}` is the run's scratch directory), e.g. `--variant ledger="--state-dir
{work}/state"` for what the recovery ledger costs; ratios compare each with `ours`.

`--peers` names the other servers: `reference` (tangd, one process per connection through socat, as systemd runs
it), `tangy` (the Rust Tang server on crates.io, Rocket with one thread per server CPU; built once by `cargo
install tangy --version 0.2.8 --locked` into bench/.cache/, which takes a few minutes, before anything is
measured) and `constant` (bare uvicorn answering constant bytes: the ceiling of our HTTP stack). tangy's
new-connection rows count about one error per request: it closes the connection as the request asks, but its
answer does not say `Connection: close`, so wrk sends the next request on it, sees the close as a read error and
reconnects. Each request counted was answered, each on a new connection.

Everything runs on this machine and loopback only. Each server is started alone, on the same key directory (made
by the reference's tangd-keygen), pinned to the server CPUs while wrk runs on the load CPU, so that a one-core
server and a one-core load generator do not compete. For every server and route it reports requests per second,
p50/p99/p99.9 latency and the server's CPU seconds per request, with kept-alive connections and with a new
connection per request (what curl in clevis does). Ratios are computed within the run, never against numbers
from another machine or another day.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CACHE = HERE / ".cache"  # git-ignored
TANGY_VERSION = "0.2.8"


@dataclass
class Measurement:
    server: str
    route: str
    connection: str
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    cpu_ms_per_request: float
    errors: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")


def cpu_seconds(root: int) -> float:
    """CPU time of a process and all its descendants, living or already reaped."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        times = stats.get(pid)
        if times is not None:  # utime, stime, cutime, cstime (the last two: reaped children)
            total += sum(int(value) for value in times[11:15])
        stack.extend(children.get(pid, []))
    return total / CLOCK_TICKS


@contextlib.contextmanager
def started(
    command: list[str], port: int, cpus: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        ["taskset", "-c", cpus, *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
    )
    try:
        wait_for(port)
        time.sleep(1.0)  # let every worker finish starting
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wrk(url: str, *, seconds: float, connections: int, cpus: str, body: Path | None, close: bool) -> dict[str, float]:
    env = {**os.environ, "WRK_BODY_FILE": str(body or ""), "WRK_CLOSE": "1" if close else "0"}
    command = [
        "taskset",
        "-c",
        cpus,
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "-s",
        str(HERE / "wrk_report.lua"),
    ]
    output = subprocess.run([*command, url], capture_output=True, text=True, env=env, check=True).stdout
    line = next(line for line in output.splitlines() if line.startswith("WRK_JSON "))
    return dict(json.loads(line.removeprefix("WRK_JSON ")))


def serve_command(keys: Path, port: int, workers: int, *extra: str) -> list[str]:
    """Our server as the benchmarks run it: no key generation, the given workers."""
    return [str(BIN / "tang-server"), "serve", "--keys-dir", str(keys), "--port", str(port),
            "--workers", str(workers), "--no-auto-keygen", *extra]  # fmt: skip


def prepare_keys(work: Path) -> tuple[Path, str, Path]:
    """A key directory made by the reference's tangd-keygen, the /rec path of its exchange key, and a file
    holding a client's public key (what clevis posts)."""
    keys = work / "keys"
    keys.mkdir()
    subprocess.run(["/usr/libexec/tangd-keygen", str(keys)], check=True, capture_output=True)
    exchange = next(p for p in keys.iterdir() if "deriveKey" in p.read_text())
    client = subprocess.run(["jose", "jwk", "gen", "-i", '{"alg":"ECMR"}'], capture_output=True, check=True).stdout
    body = work / "client.json"
    body.write_bytes(subprocess.run(["jose", "jwk", "pub", "-i-"], input=client, capture_output=True,
                                    check=True).stdout)  # fmt: skip
    return keys, f"/rec/{exchange.name.removesuffix('.jwk')}", body


def measure(
    name: str,
    process: subprocess.Popen[bytes],
    base: str,
    routes: dict[str, tuple[str, Path | None]],
    args: argparse.Namespace,
) -> list[Measurement]:
    results = []
    for route, (path, body) in routes.items():
        for close in (False, True):
            before = cpu_seconds(process.pid)
            summary = wrk(
                base + path,
                seconds=args.seconds,
                connections=args.connections,
                cpus=args.load_cpus,
                body=body,
                close=close,
            )
            used = cpu_seconds(process.pid) - before
            requests = max(summary["requests"], 1)
            results.append(
                Measurement(
                    server=name,
                    route=route,
                    connection="new" if close else "kept-alive",
                    requests_per_second=requests / (summary["duration_us"] / 1e6),
                    p50_ms=summary["p50_us"] / 1000,
                    p99_ms=summary["p99_us"] / 1000,
                    p999_ms=summary["p999_us"] / 1000,
                    cpu_ms_per_request=used * 1000 / requests,
                    errors=int(summary["socket_errors"] + summary["non_2xx"]),
                )
            )
            print(
                f"  {name:<10} {route:<5} {results[-1].connection:<10} {results[-1].requests_per_second:>9.0f} req/s"
                f"  p99 {results[-1].p99_ms:7.2f} ms  errors {results[-1].errors}",
                flush=True,
            )
    return results


def tangy_binary() -> Path:
    """tangy, built from crates.io into the bench cache the first time (it reads the reference's key directory)."""
    root = CACHE / f"tangy-{TANGY_VERSION}"
    binary = root / "bin" / "tangy"
    if not binary.exists():
        print(f"building tangy {TANGY_VERSION} into {root} (cargo install: a few minutes, once)", flush=True)
        subprocess.run(["cargo", "install", "--quiet", "tangy", "--version", TANGY_VERSION, "--locked",
                        "--root", str(root)], check=True)  # fmt: skip
    return binary


def pure_multiplication_rate(seconds: float, cpus: str) -> float:
    binary = ROOT / "target" / "release" / "examples" / "mul_rate"
    if not binary.exists():
        subprocess.run(
            ["cargo", "build", "--release", "--quiet", "-p", "tang-p521", "--example", "mul_rate"], cwd=ROOT, check=True
        )
    output = subprocess.run(
        ["taskset", "-c", cpus, str(binary), str(seconds)], capture_output=True, text=True, check=True
    ).stdout
    return float(output.split()[1])


def openssl_speed(seconds: float, cpus: str) -> float:
    output = subprocess.run(
        ["taskset", "-c", cpus, "openssl", "speed", "-seconds", str(int(max(seconds, 1))), "ecdhp521"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(output.strip().splitlines()[-1].split()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="wrk duration per measurement")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="our worker processes")
    parser.add_argument("--server-cpus", default="1", help="taskset CPU list for the servers")
    parser.add_argument("--load-cpus", default="0", help="taskset CPU list for wrk")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "load.json")
    parser.add_argument("--baseline", type=Path, help="a directory holding another version's tang_server package")
    parser.add_argument("--variant", action="append", default=[], help="NAME=ARGS: ours with extra serve arguments")
    parser.add_argument(
        "--peers", default="reference,constant", help="other servers to measure, of reference, tangy, constant"
    )
    args = parser.parse_args(argv)
    peers = set(filter(None, args.peers.split(",")))
    unknown = peers - {"reference", "tangy", "constant"}
    if unknown:
        parser.error(f"unknown peers: {', '.join(sorted(unknown))}")
    tangy = tangy_binary() if "tangy" in peers else None  # built before anything is measured

    work = Path(tempfile.mkdtemp(prefix="tang-load-"))
    try:
        keys, rec_path, body = prepare_keys(work)
        routes = {"adv": ("/adv", None), "rec": (rec_path, body)}
        results: list[Measurement] = []

        port = free_port()
        ours = serve_command(keys, port, args.workers)
        print(f"ours ({args.workers} worker(s) on CPUs {args.server_cpus}):", flush=True)
        with started(ours, port, args.server_cpus) as process:
            results += measure("ours", process, f"http://127.0.0.1:{port}", routes, args)

        if args.baseline is not None:
            port = free_port()
            print(f"baseline ({args.baseline}):", flush=True)
            environment = {**os.environ, "PYTHONPATH": str(args.baseline.resolve())}
            command = serve_command(keys, port, args.workers)
            with started(command, port, args.server_cpus, environment) as process:
                results += measure("baseline", process, f"http://127.0.0.1:{port}", routes, args)

        for variant in args.variant:
            name, _, extra = variant.partition("=")
            port = free_port()
            command = serve_command(keys, port, args.workers, *shlex.split(extra.replace("{work}", str(work))))
            print(f"{name} (ours with {extra}):", flush=True)
            with started(command, port, args.server_cpus) as process:
                results += measure(name, process, f"http://127.0.0.1:{port}", routes, args)

        if "reference" in peers:
            port = free_port()
            reference = [
                "socat",
                f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=1024",
                f"EXEC:/usr/libexec/tangd {keys}",
            ]
            print("reference (tangd through socat):", flush=True)
            with started(reference, port, args.server_cpus) as process:
                results += measure("reference", process, f"http://127.0.0.1:{port}", routes, args)

        if tangy is not None:
            port = free_port()
            print(f"tangy {TANGY_VERSION} (Rust, Rocket):", flush=True)
            command = [str(tangy), "--dir", str(keys), "--port", str(port), "--address", "127.0.0.1"]
            with started(command, port, args.server_cpus) as process:
                results += measure("tangy", process, f"http://127.0.0.1:{port}", routes, args)
            print("  (tangy's errors on new connections: its closes, which wrk did not expect; see the docstring)")

        if "constant" in peers:
            port = free_port()
            constant = [
                str(BIN / "uvicorn"),
                "constant_app:app",
                "--app-dir",
                str(HERE),
                "--port",
                str(port),
                "--workers",
                str(args.workers),
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--no-access-log",
                "--log-level",
                "warning",
            ]
            print("constant bytes (bare uvicorn):", flush=True)
            with started(constant, port, args.server_cpus) as process:
                results += measure("constant", process, f"http://127.0.0.1:{port}", {"adv": ("/adv", None)}, args)

        mul_rate = pure_multiplication_rate(args.seconds, args.server_cpus.split(",")[0])
        openssl_rate = openssl_speed(args.seconds, args.server_cpus.split(",")[0])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def rate(server: str, route: str, connection: str) -> float | None:
        wanted = (server, route, connection)
        return next((r.requests_per_second for r in results if (r.server, r.route, r.connection) == wanted), None)

    def ratio(numerator: float | None, denominator: float | None) -> float | None:
        return numerator / denominator if numerator is not None and denominator else None

    def best_peer(route: str, connection: str) -> float | None:
        rates = [rate(peer, route, connection) for peer in ("reference", "tangy")]
        return max((value for value in rates if value is not None), default=None)

    ratios = {
        "rec_vs_reference_kept_alive": ratio(rate("ours", "rec", "kept-alive"), rate("reference", "rec", "kept-alive")),
        "rec_vs_reference_new_connection": ratio(rate("ours", "rec", "new"), rate("reference", "rec", "new")),
        "adv_vs_reference_kept_alive": ratio(rate("ours", "adv", "kept-alive"), rate("reference", "adv", "kept-alive")),
        "adv_vs_reference_new_connection": ratio(rate("ours", "adv", "new"), rate("reference", "adv", "new")),
        "rec_vs_tangy_kept_alive": ratio(rate("ours", "rec", "kept-alive"), rate("tangy", "rec", "kept-alive")),
        "rec_vs_tangy_new_connection": ratio(rate("ours", "rec", "new"), rate("tangy", "rec", "new")),
        "adv_vs_tangy_kept_alive": ratio(rate("ours", "adv", "kept-alive"), rate("tangy", "adv", "kept-alive")),
        "adv_vs_tangy_new_connection": ratio(rate("ours", "adv", "new"), rate("tangy", "adv", "new")),
        "rec_vs_best_peer_kept_alive": ratio(rate("ours", "rec", "kept-alive"), best_peer("rec", "kept-alive")),
        "rec_vs_best_peer_new_connection": ratio(rate("ours", "rec", "new"), best_peer("rec", "new")),
        "adv_vs_constant_app_kept_alive": ratio(
            rate("ours", "adv", "kept-alive"), rate("constant", "adv", "kept-alive")
        ),
        "rec_per_worker_vs_pure_multiplication": ratio(rate("ours", "rec", "kept-alive"), mul_rate * args.workers),
        "multiplication_vs_openssl_speed": mul_rate / openssl_rate,
        # What a new connection costs: the boot-storm load (curl in clevis) against kept-alive clients.
        "rec_new_connection_vs_kept_alive": ratio(rate("ours", "rec", "new"), rate("ours", "rec", "kept-alive")),
    }
    others = ["baseline"] + [variant.partition("=")[0] for variant in args.variant]
    for route in routes:
        for connection in ("kept-alive", "new"):
            for other in others:
                key = f"{route}_{connection}_{other}_vs_ours"
                ratios[key] = ratio(rate(other, route, connection), rate("ours", route, connection))
    ratios = {name: value for name, value in ratios.items() if value is not None}
    report = {
        "settings": {name: str(value) if isinstance(value, Path) else value for name, value in vars(args).items()},
        "pure_multiplication_per_second": mul_rate,
        "openssl_speed_ecdhp521_per_second": openssl_rate,
        "measurements": [asdict(r) for r in results],
        "ratios": ratios,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")

    print("\n| server | route | connection | req/s | p50 ms | p99 ms | p99.9 ms | CPU ms/req | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r.server} | {r.route} | {r.connection} | {r.requests_per_second:.0f} | {r.p50_ms:.2f} | "
            f"{r.p99_ms:.2f} | {r.p999_ms:.2f} | {r.cpu_ms_per_request:.3f} | {r.errors} |"
        )
    print(f"\npure multiplication: {mul_rate:.0f}/s; openssl speed ecdhp521: {openssl_rate:.0f}/s")
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
