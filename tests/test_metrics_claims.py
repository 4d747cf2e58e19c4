"""The metrics the README names that the Prometheus test does not reach, read with prometheus-client's own parser:
`tang_http_requests_in_flight`, `tang_keyset_ready`, `tang_keyset_last_reload_timestamp_seconds`,
`tang_keyset_reload_failures_total`, the buckets from 100 us, the metrics directory emptied at start, and the
workers that died marked dead (their per-process series gone)."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from .listening import worker_pids
from .support import client_key, load_keys, our_server, request, thumbprint

Samples = list[tuple[str, dict[str, str], float]]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=20) as response:
        text = response.read().decode()  # chunked: let urllib undo it
    families = text_string_to_metric_families(text)
    return [(sample.name, sample.labels, sample.value) for family in families for sample in family.samples]


def values(samples: Samples, name: str) -> list[tuple[dict[str, str], float]]:
    return [(labels, value) for sample, labels, value in samples if sample == name]


def by_pid(samples: Samples, name: str) -> dict[str, float]:
    return {labels["pid"]: value for labels, value in values(samples, name)}


def eventually(port: int, condition: Callable[[Samples], bool], timeout: float = 30.0) -> Samples:
    """Scrape until `condition` holds; the deadline only bounds a hang."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if condition(samples):
            return samples
        assert time.monotonic() < deadline, "the metrics never showed the expected values"
        time.sleep(0.1)


def test_requests_in_flight_counts_a_request_being_answered(keys: Path, tmp_path: Path) -> None:
    _, exchange = load_keys(keys)
    body = json.dumps(client_key()).encode()
    with our_server(keys, tmp_path / "log") as server:

        def in_flight() -> float:
            (sample,) = values(scrape(server.port), "tang_http_requests_in_flight")
            return sample[1]

        idle = in_flight()  # the scrape itself is a request being answered
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as conn:
            # A chunked /rec takes the general path and waits for the rest of its body.
            conn.sendall(f"POST /rec/{thumbprint(exchange)} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                         f"Connection: close\r\n\r\n{len(body):x}\r\n".encode() + body + b"\r\n")  # fmt: skip
            deadline = time.monotonic() + 20
            while in_flight() != idle + 1:
                assert time.monotonic() < deadline, "the held request was never counted in flight"
                time.sleep(0.05)
            conn.sendall(b"0\r\n\r\n")
            assert conn.recv(12) == b"HTTP/1.1 200"
        deadline = time.monotonic() + 20
        while in_flight() != idle:
            assert time.monotonic() < deadline, "the answered request stayed in flight"
            time.sleep(0.05)


def test_keyset_ready_and_last_reload_per_worker(keys: Path, tmp_path: Path) -> None:
    started = time.time()
    with our_server(keys, tmp_path / "log", "--no-auto-keygen", workers=2) as server:
        pids = {str(pid) for pid in worker_pids(server.process.pid)}
        # Every worker reports, and is ready once it has loaded the keys.
        samples = eventually(server.port, lambda s: by_pid(s, "tang_keyset_ready") == dict.fromkeys(pids, 1.0))
        loaded = by_pid(samples, "tang_keyset_last_reload_timestamp_seconds")
        assert set(loaded) == pids
        assert all(started - 1 <= value <= time.time() for value in loaded.values())

        changed = time.time()
        exchange = next(path for path in keys.glob("*.jwk") if "deriveKey" in path.read_text())
        exchange.rename(keys / f".{exchange.name}")  # no visible exchange key: not ready
        samples = eventually(server.port, lambda s: set(by_pid(s, "tang_keyset_ready").values()) == {0.0})
        assert set(by_pid(samples, "tang_keyset_ready")) == pids
        reloaded = by_pid(samples, "tang_keyset_last_reload_timestamp_seconds")
        assert all(changed - 1 <= value <= time.time() for value in reloaded.values())
        assert request(server.port, "GET", "/readyz").status == 503


def test_reload_failures_are_counted(keys: Path, tmp_path: Path) -> None:
    with our_server(keys, tmp_path / "log", "--no-auto-keygen") as server:
        (failures,) = values(scrape(server.port), "tang_keyset_reload_failures_total")
        assert failures[1] == 0
        keys.rename(tmp_path / "away")
        assert request(server.port, "GET", "/adv").status == 200  # the last set serves
        eventually(server.port, lambda s: values(s, "tang_keyset_reload_failures_total")[0][1] >= 1)


def test_histograms_have_sub_millisecond_buckets_from_100_us(keys: Path, tmp_path: Path) -> None:
    _, exchange = load_keys(keys)
    with our_server(keys, tmp_path / "log") as server:
        assert request(server.port, "GET", "/adv").status == 200
        body = json.dumps(client_key()).encode()
        assert request(server.port, "POST", f"/rec/{thumbprint(exchange)}", body).status == 200
        samples = scrape(server.port)
    for name in ("tang_http_request_duration_seconds_bucket", "tang_recovery_exchange_duration_seconds_bucket"):
        bounds = sorted({float(labels["le"]) for labels, _ in values(samples, name)})
        assert bounds[0] == 0.0001, name
        assert [b for b in bounds if b < 0.001] == [0.0001, 0.00025, 0.0005], name
        assert bounds[-1] == float("inf")


def test_metrics_directory_is_emptied_at_start(keys: Path, tmp_path: Path) -> None:
    directory = tmp_path / "metrics"
    extra = ("--metrics-dir", str(directory))
    with our_server(keys, tmp_path / "first", *extra) as server:
        for _ in range(5):
            assert request(server.port, "GET", "/adv").status == 200
    assert list(directory.glob("*.db"))  # the first run's counters are still on disk
    with our_server(keys, tmp_path / "second", *extra) as server:
        assert request(server.port, "GET", "/adv").status == 200
        samples = scrape(server.port)
    counted = [value for labels, value in values(samples, "tang_http_requests_total") if labels["route"] == "/adv"]
    assert counted == [1.0]  # only this run's request, not 6


def test_dead_workers_are_marked_and_their_series_go(keys: Path, tmp_path: Path) -> None:
    with our_server(keys, tmp_path / "log", workers=2) as server:
        before = {str(pid) for pid in worker_pids(server.process.pid)}
        eventually(server.port, lambda s: set(by_pid(s, "tang_keyset_ready")) == before)
        victim = sorted(before)[0]
        os.kill(int(victim), signal.SIGKILL)

        def replaced(samples: Samples) -> bool:
            live = {str(pid) for pid in worker_pids(server.process.pid)}
            shown = set(by_pid(samples, "tang_keyset_ready"))
            return len(live) == 2 and victim not in live and shown == live

        samples = eventually(server.port, replaced)
        shown = {labels["pid"] for labels, _ in values(samples, "tang_keyset_info")}
        assert victim not in shown
