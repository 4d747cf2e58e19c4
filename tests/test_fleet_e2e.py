"""Replicas behind a load balancer during a rotation, end to end.

Three replicas run as separate processes with two workers each. Each has its own copy of the key directory laid
out like a Kubernetes Secret volume and updated as the kubelet updates it (the `..data` swap), from one source
directory that stands for the Secret, each with its own propagation delay. HAProxy balances them round-robin
behind one URL, with health checks on `/readyz` and neither retries nor redispatch: a request dropped anywhere
fails as it would for clevis. While a rotation or a rolling restart (SIGTERM, one replica after the other) runs,
real `clevis encrypt tang` + `clevis decrypt` round trips go through the load balancer, with continuous `/adv` and
`/rec` load on new connections; every attempt is counted and every failure of any kind fails the test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tang_server.keys import b64, keyfiles
from tang_server.keys.keyset import KeyKind, load_keyset

from .support import (
    BIN,
    Response,
    SecretVolume,
    Server,
    client_key,
    free_port,
    request,
    require_tools,
    running,
    serve_command,
    thumbprint,
)

DELAYS = (0.2, 1.0, 2.5)  # seconds from a change of the Secret to each replica's volume


class Kubelet:
    """Copies the source directory into a replica's volume, `delay` seconds after each change, atomically."""

    def __init__(self, source: Path, volume: SecretVolume, delay: float) -> None:
        self.source, self.volume, self.delay = source, volume, delay
        self.stop = threading.Event()
        self.published: dict[str, bytes] = {}
        self.publish(self.snapshot())
        self.thread = threading.Thread(target=self.run, daemon=True)

    def snapshot(self) -> dict[str, bytes]:
        files = {}
        for path in self.source.iterdir():
            if path.name.endswith(".jwk"):
                try:
                    files[path.name] = path.read_bytes()
                except FileNotFoundError:
                    continue  # renamed while we looked; the next look sees it
        return files

    def publish(self, files: dict[str, bytes]) -> None:
        self.volume.publish(files)
        self.published = files

    def run(self) -> None:
        pending: dict[str, bytes] | None = None
        seen_at = 0.0
        while not self.stop.is_set():
            current = self.snapshot()
            if current != self.published and current != pending:
                pending, seen_at = current, time.monotonic()
            if pending is not None and time.monotonic() - seen_at >= self.delay:
                self.publish(pending)
                pending = None
            time.sleep(0.05)


@dataclass
class Restart:
    """Seconds from SIGTERM to each step of one replica's graceful restart."""

    replica: int
    not_ready: float  # its /readyz answers 503 (asked directly)
    out_of_balancer: float  # HAProxy marks it DOWN
    exited: float  # every process of the old replica has exited (status 0)
    ready: float  # the new process answers /readyz with 200
    in_balancer: float  # HAProxy marks it UP again

    def __str__(self) -> str:
        return (
            f"r{self.replica}: not ready {self.not_ready:.2f}s, out of HAProxy {self.out_of_balancer:.2f}s, "
            f"exited {self.exited:.2f}s, new one ready {self.ready:.2f}s, back in HAProxy {self.in_balancer:.2f}s"
        )


@dataclass
class Fleet:
    source: Path
    replicas: list[Server]
    balancer: str
    balancer_port: int
    kubelets: list[Kubelet]
    restart: Callable[[int], Restart]

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.replicas]


DRAIN_SECONDS = 2.0  # long enough for HAProxy's checks (every 200 ms, one failure) to take a replica out

# No retries and no redispatch: a request HAProxy could not deliver, or that got no answer, fails as it would for
# clevis (curl, one request per connection, no retry). `retries` defaults to 3 on connection failures: hence 0.
HAPROXY = """
global
    maxconn 2000
    stats socket {stats} mode 600 level admin
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    retries 0
frontend tang
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /readyz
{servers}
"""


def _balancer_status(stats: Path, index: int) -> str:
    """HAProxy's view of replica `index`: UP, DOWN, ... (from its stats socket)."""
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(str(stats))
        conn.sendall(b"show stat\n")
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    columns = lines[0].lstrip("# ").split(",")
    for line in lines[1:]:
        row = dict(zip(columns, line.split(","), strict=False))
        if row.get("pxname") == "replicas" and row.get("svname") == f"r{index}":
            return row["status"]
    raise AssertionError(f"replica r{index} not in HAProxy's stats")


def _wait(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _readiness(port: int) -> int:
    try:
        return request(port, "GET", "/readyz").status
    except OSError:
        return 0  # not listening (exited, or not started yet)


@contextmanager
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    require_tools("haproxy", "clevis")
    source = tmp_path / "secret"
    keyfiles.generate_keys(source)
    stats = tmp_path / "haproxy.sock"
    with ExitStack() as stack:
        kubelets, ports = [], []
        for index, delay in enumerate(DELAYS):
            volume = SecretVolume(tmp_path / f"volume{index}")
            kubelet = Kubelet(source, volume, delay)
            kubelets.append(kubelet)
            port = free_port()
            ports.append(port)
        replicas: list[Server | None] = [None] * len(DELAYS)
        stacks = [ExitStack() for _ in DELAYS]

        def start(index: int) -> None:
            command = serve_command(kubelets[index].volume.path, ports[index], "--fleet",
                                    f"--drain-seconds={DRAIN_SECONDS}", workers=2)  # fmt: skip
            replicas[index] = stacks[index].enter_context(
                running(command, ports[index], tmp_path / f"replica{index}-{time.monotonic_ns()}.log")
            )

        def restart(index: int) -> Restart:
            """SIGTERM to the replica (its supervisor, as Kubernetes does), then a new one when it has exited."""
            server = replicas[index]
            assert server is not None
            began = time.monotonic()
            os.kill(server.process.pid, signal.SIGTERM)
            _wait(lambda: _readiness(ports[index]) != 200, "not ready")
            not_ready = time.monotonic() - began
            _wait(lambda: _balancer_status(stats, index).startswith("DOWN"), "HAProxy to take it out")
            out = time.monotonic() - began
            assert server.process.wait(timeout=60) == 0
            exited = time.monotonic() - began
            stacks[index].close()
            start(index)
            _wait(lambda: _readiness(ports[index]) == 200, "the new replica to be ready")
            ready = time.monotonic() - began
            _wait(lambda: _balancer_status(stats, index) == "UP", "HAProxy to take it back")
            return Restart(index, not_ready, out, exited, ready, time.monotonic() - began)

        def stop_all() -> None:  # all at once: each drains for DRAIN_SECONDS
            for server in replicas:
                if server is not None and server.process.poll() is None:
                    os.kill(server.process.pid, signal.SIGTERM)

        for index in range(len(DELAYS)):
            start(index)
            stack.callback(stacks[index].close)
        for kubelet in kubelets:
            kubelet.thread.start()
            stack.callback(kubelet.stop.set)
        port = free_port()
        servers_config = "\n".join(
            f"    server r{i} 127.0.0.1:{p} check inter 200ms fall 1 rise 1" for i, p in enumerate(ports)
        )
        config = tmp_path / "haproxy.cfg"
        config.write_text(HAPROXY.format(port=port, servers=servers_config, stats=stats))
        stack.enter_context(running(["haproxy", "-db", "-f", str(config)], port, tmp_path / "haproxy.log"))
        stack.callback(stop_all)
        for index in range(len(DELAYS)):
            _wait(lambda: _balancer_status(stats, index) == "UP", "HAProxy's first checks")  # noqa: B023
        live = [server for server in replicas if server is not None]
        yield Fleet(source, live, f"http://127.0.0.1:{port}", port, kubelets, restart)


def _clevis_encrypt(url: str, secret: bytes) -> subprocess.CompletedProcess[bytes]:
    pin = json.dumps({"url": url})
    return subprocess.run(["clevis", "encrypt", "tang", pin, "-y"], input=secret, capture_output=True, timeout=60)


def _clevis_round_trip(url: str, secret: bytes) -> bytes | None:
    encrypted = _clevis_encrypt(url, secret)
    return encrypted.stdout if encrypted.returncode == 0 else None


def _clevis_decrypt(jwe: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["clevis", "decrypt"], input=jwe, capture_output=True, timeout=60)


def _decrypt(jwe: bytes) -> bytes | None:
    result = _clevis_decrypt(jwe)
    return result.stdout if result.returncode == 0 else None


def _advertised_exchange_kids(response: Response) -> set[str]:
    payload = json.loads(b64.decode(json.loads(response.body)["payload"]))
    return {thumbprint(key) for key in payload["keys"] if "deriveKey" in key.get("key_ops", [])}


class Traffic:
    """Load through the balancer, every request on a new connection: real `clevis decrypt` of a secret bound at
    the start, `clevis encrypt` + `decrypt` round trips, and loops of `/adv` then `/rec` for every exchange key
    ever advertised. Every attempt is counted by kind, and every failure of any kind is recorded."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.failures: list[str] = []
        self.advertised: set[str] = set()
        self.body = json.dumps(client_key()).encode()
        self.secret = b"bound before the load"
        bound = _clevis_round_trip(fleet.balancer, self.secret)
        assert bound is not None
        self.bound = bound
        loops = [self.decrypt_loop, self.round_trip_loop, self.recovery_loop, self.recovery_loop]
        self.threads = [threading.Thread(target=self.run, args=(loop,), daemon=True) for loop in loops]

    def attempt(self, kind: str, failure: Callable[[], str | None]) -> None:
        """Runs one attempt; `failure` returns why it failed, or None. An exception is a failure too."""
        try:
            why = failure()
        except Exception as exc:
            why = repr(exc)
        with self.lock:
            self.counts[kind] += 1
            if why is not None:
                self.failures.append(f"{kind}: {why}")

    def run(self, loop: Callable[[], None]) -> None:
        while not self.stop.is_set():
            loop()

    def decrypt_loop(self) -> None:
        def failure() -> str | None:
            result = _clevis_decrypt(self.bound)
            return None if result.stdout == self.secret else f"exit {result.returncode} {result.stderr[-200:]!r}"

        self.attempt("clevis decrypt", failure)

    def round_trip_loop(self) -> None:
        secret = f"secret {self.counts['clevis encrypt']}".encode()
        jwe: list[bytes] = []

        def encrypt() -> str | None:
            result = _clevis_encrypt(self.fleet.balancer, secret)
            jwe.append(result.stdout)
            return None if result.returncode == 0 else f"exit {result.returncode} {result.stderr[-200:]!r}"

        def decrypt() -> str | None:
            result = _clevis_decrypt(jwe[0])
            return None if result.stdout == secret else f"exit {result.returncode} {result.stderr[-200:]!r}"

        self.attempt("clevis encrypt", encrypt)
        if jwe and jwe[0]:
            self.attempt("clevis decrypt", decrypt)

    def recovery_loop(self) -> None:
        def advertisement() -> str | None:
            response = request(self.fleet.balancer_port, "GET", "/adv")
            if response.status != 200:
                return f"status {response.status}"
            kids = _advertised_exchange_kids(response)
            with self.lock:
                self.advertised |= kids
            return None

        self.attempt("/adv", advertisement)
        with self.lock:
            kids = sorted(self.advertised)
        for kid in kids:  # none may answer 404: every replica holds every key ever advertised

            def recovery(kid: str = kid) -> str | None:
                status = request(self.fleet.balancer_port, "POST", f"/rec/{kid}", self.body).status
                return None if status == 200 else f"{kid[:8]} -> {status}"

            self.attempt("/rec", recovery)

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)

    def wait_for_load(self) -> None:
        """Until every kind of request has run once more from now: there is load before what a test does, and
        after it (a condition, never a count reached in some time)."""
        kinds = ("clevis decrypt", "clevis encrypt", "/adv", "/rec")
        with self.lock:
            before = {kind: self.counts[kind] for kind in kinds}
        _wait(lambda: all(self.counts[kind] > before[kind] for kind in kinds), "every kind of request to run")

    def report(self) -> str:
        counts = ", ".join(f"{count} {kind}" for kind, count in sorted(self.counts.items()))
        return f"{counts}; {len(self.failures)} failed: {self.failures[:20]}"


def _rotate(fleet: Fleet, on_waiting: Callable[[], None] = lambda: None) -> subprocess.CompletedProcess[str]:
    command = [str(BIN / "tang-server"), "fleet", "rotate", "--keys-dir", str(fleet.source), "--timeout", "60",
               *fleet.urls]  # fmt: skip
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None and process.stderr is not None
        output = []
        for line in process.stdout:
            output.append(line)
            if line.startswith("2/4 waiting"):
                on_waiting()
        stderr = process.stderr.read()
        return subprocess.CompletedProcess(command, process.wait(), "".join(output), stderr)


def test_two_phase_rotation_behind_a_load_balancer(tmp_path: Path) -> None:
    with fleet(tmp_path) as f:
        before = _clevis_round_trip(f.balancer, b"bound before the rotation")
        assert before is not None
        old_exchange = {k.kid for k in load_keyset(f.source).keys if k.kind is KeyKind.EXCHANGE}
        with Traffic(f) as traffic:
            traffic.wait_for_load()
            result = _rotate(f)
            traffic.wait_for_load()
        assert result.returncode == 0, result.stdout + result.stderr
        new_exchange = {k.kid for k in load_keyset(f.source).visible if k.kind is KeyKind.EXCHANGE}
        print(f"two-phase rotation: {traffic.report()}")
        assert traffic.failures == []
        assert old_exchange | new_exchange <= traffic.advertised  # both keys were hammered
        assert _decrypt(before) == b"bound before the rotation"


def test_rotation_completes_with_a_replica_restarted_midway(tmp_path: Path) -> None:
    with fleet(tmp_path) as f:
        restarts: list[Restart] = []
        with Traffic(f) as traffic:
            traffic.wait_for_load()
            result = _rotate(f, on_waiting=lambda: restarts.append(f.restart(1)))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "4/4 waiting" in result.stdout
        final = load_keyset(f.source).digest
        assert subprocess.run([str(BIN / "tang-server"), "fleet", "wait", "--digest", final, "--timeout", "10",
                               *f.urls], capture_output=True).returncode == 0  # fmt: skip
        print(f"rotation with a restart ({restarts[0]}): {traffic.report()}")
        assert traffic.failures == []
        assert len(restarts) == 1


def test_rolling_restart_loses_nothing(tmp_path: Path) -> None:
    """Every replica restarted in turn with SIGTERM under continuous clevis and /rec load: not one failure."""
    with fleet(tmp_path) as f:
        with Traffic(f) as traffic:
            traffic.wait_for_load()
            restarts = [f.restart(index) for index in range(len(f.replicas))]
            traffic.wait_for_load()
        print(f"rolling restart, --drain-seconds={DRAIN_SECONDS}:", *restarts, traffic.report(), sep="\n  ")
        assert traffic.failures == []


def test_naive_one_phase_rotation_would_fail_the_check(tmp_path: Path) -> None:
    """Advertising a new key before every replica holds it: a client can bind on one replica and find the key
    unknown on another. The same check as above sees it, so the check is able to fail."""
    with fleet(tmp_path) as f:
        # The slowest replica's volume is held back (its kubelet stopped), so that it is certainly behind.
        f.kubelets[-1].stop.set()
        f.kubelets[-1].thread.join()
        keyfiles.rotate(f.source)  # one phase: new pair visible at once
        new = next(k.kid for k in load_keyset(f.source).visible if k.kind is KeyKind.EXCHANGE)
        _wait(lambda: new in _advertised_exchange_kids(request(f.balancer_port, "GET", "/adv")), "the new key")
        body = json.dumps(client_key()).encode()
        statuses = [request(server.port, "POST", f"/rec/{new}", body).status for server in f.replicas]
    assert 404 in statuses  # advertised by a fast replica, unknown to the slowest
    assert 200 in statuses


@pytest.fixture(autouse=True)
def _bounded() -> None:
    require_tools("haproxy", "clevis", "curl")
