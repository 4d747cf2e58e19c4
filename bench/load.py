"""Load harness: our server, its peers (the reference C server, tangy) and the two ceilings, measured by wrk in one run.

    python bench/load.py [--seconds 5] [--connections 16] [--workers 1] [--output bench/results/load.json]
                         [--baseline DIR] [--variant NAME=ARGS]... [--peers reference,tangy,constant] [--rounds 1]

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
from another machine or another day. Every server runs for the whole measurement, idle
but for its turn: each route and connection mode is measured on each server in turn, `--rounds N` times over,
and each figure reported is the median over the rounds. On a shared machine a neighbour's burst of load then moves
one measurement of every server rather than every measurement of one.
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
import statistics
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


@dataclass
class Contender:
    """A server measured in every round."""

    title: str
    name: str
    command: list[str]
    port: int
    env: dict[str, str] | None = None
    adv_only: bool = False  # the constant app answers every path alike: /rec would measure nothing new


def median_of(rounds: list[list[Measurement]]) -> list[Measurement]:
    """Each server, route and connection's median over the rounds (errors: summed)."""
    if len(rounds) == 1:
        return rounds[0]
    merged = []
    for first in rounds[0]:
        same = [m for measured in rounds for m in measured
                if (m.server, m.route, m.connection) == (first.server, first.route, first.connection)]  # fmt: skip
        merged.append(Measurement(
            server=first.server, route=first.route, connection=first.connection,
            requests_per_second=statistics.median(m.requests_per_second for m in same),
            p50_ms=statistics.median(m.p50_ms for m in same),
            p99_ms=statistics.median(m.p99_ms for m in same),
            p999_ms=statistics.median(m.p999_ms for m in same),
            cpu_ms_per_request=statistics.median(m.cpu_ms_per_request for m in same),
            errors=sum(m.errors for m in same),
        ))  # fmt: skip
    return merged


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
    url: str,
    route: str,
    body: Path | None,
    close: bool,
    args: argparse.Namespace,
) -> Measurement:
    before = cpu_seconds(process.pid)
    summary = wrk(url, seconds=args.seconds, connections=args.connections, cpus=args.load_cpus, body=body, close=close)
    used = cpu_seconds(process.pid) - before
    requests = max(summary["requests"], 1)
    result = Measurement(
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
    print(
        f"  {name:<10} {route:<5} {result.connection:<10} {result.requests_per_second:>9.0f} req/s"
        f"  p99 {result.p99_ms:7.2f} ms  errors {result.errors}",
        flush=True,
    )
    return result


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
    parser.add_argument("--rounds", type=int, default=1, help="measure every server this many times, interleaved")
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
        ours_title = f"ours ({args.workers} worker(s) on CPUs {args.server_cpus})"
        port = free_port()
        contenders = [Contender(ours_title, "ours", serve_command(keys, port, args.workers), port)]
        if args.baseline is not None:
            port = free_port()
            environment = {**os.environ, "PYTHONPATH": str(args.baseline.resolve())}
            command = serve_command(keys, port, args.workers)
            contenders.append(Contender(f"baseline ({args.baseline})", "baseline", command, port, environment))
        for variant in args.variant:
            name, _, extra = variant.partition("=")
            port = free_port()
            command = serve_command(keys, port, args.workers, *shlex.split(extra.replace("{work}", str(work))))
            contenders.append(Contender(f"{name} (ours with {extra})", name, command, port))
        if "reference" in peers:
            port = free_port()
            reference = ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=1024",
                         f"EXEC:/usr/libexec/tangd {keys}"]  # fmt: skip
            contenders.append(Contender("reference (tangd through socat)", "reference", reference, port))
        if tangy is not None:
            port = free_port()
            command = [str(tangy), "--dir", str(keys), "--port", str(port), "--address", "127.0.0.1"]
            contenders.append(Contender(f"tangy {TANGY_VERSION} (Rust, Rocket)", "tangy", command, port))
        if "constant" in peers:
            port = free_port()
            constant = [str(BIN / "uvicorn"), "constant_app:app", "--app-dir", str(HERE), "--port", str(port),
                        "--workers", str(args.workers), "--loop", "uvloop", "--http", "httptools",
                        "--no-access-log", "--log-level", "warning"]  # fmt: skip
            contenders.append(Contender("constant bytes (bare uvicorn)", "constant", constant, port, adv_only=True))

        rounds: list[list[Measurement]] = []
        with contextlib.ExitStack() as running:
            processes = {}
            for contender in contenders:
                print(f"{contender.name}: {contender.title}", flush=True)
                started_here = started(contender.command, contender.port, args.server_cpus, contender.env)
                processes[contender.name] = running.enter_context(started_here)
            # Interleaved: each route and connection mode is measured on every server in turn, so that a
            # neighbour's burst of load moves one row of every server rather than every row of one.
            for number in range(args.rounds):
                print(f"round {number + 1} of {args.rounds}:", flush=True)
                measured = []
                for route, (path, payload) in routes.items():
                    for close in (False, True):
                        for contender in contenders:
                            if route == "adv" or not contender.adv_only:
                                url = f"http://127.0.0.1:{contender.port}{path}"
                                process = processes[contender.name]
                                measured.append(measure(contender.name, process, url, route, payload, close, args))
                order = [contender.name for contender in contenders]
                rounds.append(sorted(measured, key=lambda m: order.index(m.server)))  # stable: routes keep order
        if tangy is not None:
            print("(tangy's errors on new connections: its closes, which wrk did not expect; see the docstring)")
        results = median_of(rounds)

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
        "rounds": [[asdict(r) for r in measured] for measured in rounds],
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
