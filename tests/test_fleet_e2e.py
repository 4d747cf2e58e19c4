"""Replicas behind a load balancer during a rotation, end to end.

Three replicas run as separate processes with two workers each. Each has its own copy of the key directory laid
out like a Kubernetes Secret volume and updated as the kubelet updates it (the `..data` swap), from one source
directory that stands for the Secret, each with its own propagation delay. HAProxy balances them round-robin
behind one URL. While a rotation runs, real `clevis encrypt tang` + `clevis decrypt` round trips go through the
load balancer, with continuous `/rec` load for the old and the new exchange key.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tang_server import b64, keyfiles
from tang_server.keyset import KeyKind, load_keyset

from .support import (
    BIN,
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
class Fleet:
    source: Path
    replicas: list[Server]
    balancer: str
    balancer_port: int
    kubelets: list[Kubelet]
    restart: Callable[[int], None] = field(default=lambda index: None)

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.replicas]


HAPROXY = """
global
    maxconn 2000
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    retries 3
    option redispatch
    retry-on conn-failure empty-response
frontend tang
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /readyz
{servers}
"""


@contextmanager
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    require_tools("haproxy", "clevis")
    source = tmp_path / "secret"
    keyfiles.generate_keys(source)
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
            command = serve_command(kubelets[index].volume.path, ports[index], "--fleet", workers=2)
            replicas[index] = stacks[index].enter_context(
                running(command, ports[index], tmp_path / f"replica{index}-{time.monotonic_ns()}.log")
            )

        def restart(index: int) -> None:
            """kill -9 the replica (parent and workers), then start it again on the same port."""
            server = replicas[index]
            assert server is not None
            os.killpg(server.process.pid, signal.SIGKILL)
            stacks[index].close()
            time.sleep(1.0)
            start(index)

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
        config.write_text(HAPROXY.format(port=port, servers=servers_config))
        stack.enter_context(running(["haproxy", "-db", "-f", str(config)], port, tmp_path / "haproxy.log"))
        time.sleep(0.5)  # first health checks
        live = [server for server in replicas if server is not None]
        yield Fleet(source, live, f"http://127.0.0.1:{port}", port, kubelets, restart)


def _clevis_round_trip(url: str, secret: bytes) -> bytes | None:
    pin = json.dumps({"url": url})
    encrypted = subprocess.run(["clevis", "encrypt", "tang", pin, "-y"], input=secret, capture_output=True, timeout=60)
    if encrypted.returncode != 0:
        return None
    return encrypted.stdout


def _decrypt(jwe: bytes) -> bytes | None:
    result = subprocess.run(["clevis", "decrypt"], input=jwe, capture_output=True, timeout=60)
    return result.stdout if result.returncode == 0 else None


def _advertised_exchange_kids(port: int) -> set[str]:
    response = request(port, "GET", "/adv")
    if response.status != 200:
        return set()
    payload = json.loads(b64.decode(json.loads(response.body)["payload"]))
    return {thumbprint(key) for key in payload["keys"] if "deriveKey" in key.get("key_ops", [])}


class Traffic:
    """Clevis round trips and /rec load through the balancer, recording every failure."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.round_trips = 0
        self.recoveries = 0
        self.advertised: set[str] = set()
        self.body = json.dumps(client_key()).encode()
        self.threads = [
            threading.Thread(target=self.clevis_loop, daemon=True),
            threading.Thread(target=self.recovery_loop, daemon=True),
            threading.Thread(target=self.recovery_loop, daemon=True),
        ]

    def clevis_loop(self) -> None:
        while not self.stop.is_set():
            secret = f"secret {self.round_trips}".encode()
            jwe = _clevis_round_trip(self.fleet.balancer, secret)
            if jwe is None:
                self.failures.append("clevis encrypt failed")
            elif _decrypt(jwe) != secret:
                self.failures.append("clevis decrypt failed")
            self.round_trips += 1

    def recovery_loop(self) -> None:
        """/rec for every exchange key ever advertised through the balancer: none may answer 404."""
        while not self.stop.is_set():
            self.advertised |= _advertised_exchange_kids(self.fleet.balancer_port)
            for kid in sorted(self.advertised):
                status = request(self.fleet.balancer_port, "POST", f"/rec/{kid}", self.body).status
                self.recoveries += 1
                if status != 200:
                    self.failures.append(f"/rec {kid[:8]} -> {status}")

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)


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
            time.sleep(1.0)
            result = _rotate(f)
            time.sleep(1.0)
        assert result.returncode == 0, result.stdout + result.stderr
        new_exchange = {k.kid for k in load_keyset(f.source).visible if k.kind is KeyKind.EXCHANGE}
        print(
            f"two-phase: {traffic.round_trips} clevis round trips, {traffic.recoveries} /rec, "
            f"failures {traffic.failures}"
        )
        assert traffic.failures == []
        assert traffic.round_trips >= 5 and traffic.recoveries >= 50
        assert old_exchange | new_exchange <= traffic.advertised  # both keys were hammered
        assert _decrypt(before) == b"bound before the rotation"


def test_rotation_completes_with_a_replica_restarted_midway(tmp_path: Path) -> None:
    with fleet(tmp_path) as f:
        with Traffic(f) as traffic:
            result = _rotate(f, on_waiting=lambda: f.restart(1))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "4/4 waiting" in result.stdout
        final = load_keyset(f.source).digest
        assert subprocess.run([str(BIN / "tang-server"), "fleet", "wait", "--digest", final, "--timeout", "10",
                               *f.urls], capture_output=True).returncode == 0  # fmt: skip
        print(f"restart: {traffic.round_trips} round trips, {traffic.recoveries} /rec, failures {traffic.failures}")
        assert traffic.round_trips >= 3
        assert [failure for failure in traffic.failures if "decrypt" in failure] == []


def test_naive_one_phase_rotation_would_fail_the_check(tmp_path: Path) -> None:
    """Advertising a new key before every replica holds it: a client can bind on one replica and find the key
    unknown on another. The same check as above sees it, so the check is able to fail."""
    with fleet(tmp_path) as f:
        keyfiles.rotate(f.source)  # one phase: new pair visible at once
        new = next(k.kid for k in load_keyset(f.source).visible if k.kind is KeyKind.EXCHANGE)
        deadline = time.monotonic() + 10
        while new not in _advertised_exchange_kids(f.balancer_port):
            assert time.monotonic() < deadline
        body = json.dumps(client_key()).encode()
        statuses = [request(server.port, "POST", f"/rec/{new}", body).status for server in f.replicas]
    assert 404 in statuses  # advertised by a fast replica, unknown to the slowest
    assert 200 in statuses


@pytest.fixture(autouse=True)
def _bounded() -> None:
    require_tools("haproxy", "clevis", "curl")
