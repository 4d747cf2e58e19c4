"""Usage per key in the metrics and /status, `keys usage`, and delete-hidden's guard."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from tang_server.keys import keyfiles
from tang_server.keys.keyset import load_keyset
from tang_server.ops import ledger
from tang_server.ops.retirement import DAY, Seen, Source, judge

from .support import BIN, Server, our_server, raw_request
from .test_ledger import FAST_FLUSH, eventually, exchange_kid, recover


def scrape(server: Server) -> str:
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as response:  # noqa: S310 - loopback
        return str(response.read().decode())


def status(server: Server) -> dict[str, Any]:
    answer = raw_request(server.port, b"GET /status HTTP/1.1\r\nConnection: close\r\n\r\n")
    document: dict[str, Any] = json.loads(answer.partition(b"\r\n\r\n")[2])
    return document


def sample(text: str, name: str) -> float | None:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


READY = re.compile(r'^tang_keyset_ready\{pid="\d+"\} 1\.0$', re.MULTILINE)


def series(text: str) -> list[str]:
    """Every sample's name and labels, without its value."""
    return sorted(line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#"))


def test_flood_of_random_key_ids_adds_no_series_and_no_rows(keys: Path, tmp_path: Path) -> None:
    """Recoveries for 300 random key ids are counted in one series; /metrics and the ledger keep their size;
    each id and client address is in its access-log line."""
    state = tmp_path / "state"
    kid = exchange_kid(keys)
    with our_server(keys, tmp_path / "server.log", "--state-dir", str(state), *FAST_FLUSH, workers=2) as server:
        recover(server, kid)
        recover(server, "unknownunknownunknownunknownunknownunknown1", expect=404)
        eventually(lambda: sample(scrape(server), "tang_recovery_unknown_key_total") == 1, "the first 404 counted")
        eventually(lambda: f'tang_recoveries_total{{kid="{kid}",visibility="visible"}} 1.0' in scrape(server),
                   "the recovery counted")  # fmt: skip
        # Both workers' own series exist once each has loaded its keys: wait for that, or the second worker's
        # first series would appear between the two scrapes. `tang_keyset_ready` is written last by a load, and
        # its series exists (at 0) from the worker's start: wait for its value.
        eventually(lambda: len(READY.findall(scrape(server))) == 2, "both workers serving")
        before = series(scrape(server))
        rows = set(ledger.read(ledger.path_in(state)))
        flood = [secrets.token_urlsafe(32) for _ in range(300)]
        for random_id in flood:
            recover(server, random_id, expect=404)
        eventually(lambda: sample(scrape(server), "tang_recovery_unknown_key_total") == 301, "the flood counted")
        after = scrape(server)
        assert series(after) == before
        assert not any(random_id in after for random_id in flood)
        assert set(ledger.read(ledger.path_in(state))) == rows
    log = server.log_text()
    assert f'127.0.0.1 "POST /rec/{flood[-1]} HTTP/1.1" 404' in log
    assert "recoveries asked for key ids that match no key" in log


def test_status_shows_usage_without_addresses(keys: Path, tmp_path: Path) -> None:
    """/status: per key, recoveries and last recovery of every worker (ledger or metrics), no client address."""
    kid = exchange_kid(keys)
    for extra in (("--state-dir", str(tmp_path / "state")), ()):
        options = (*extra, *FAST_FLUSH, "--trusted-proxy", "127.0.0.1/32")
        with our_server(keys, tmp_path / f"server{len(extra)}.log", *options, workers=2) as server:
            for _ in range(6):
                recover(server, kid, "203.0.113.9")

            def counted() -> bool:
                usage = status(server)["usage"]
                assert isinstance(usage, dict)
                rows = {row["kid"]: row for row in usage["keys"]}
                return kid in rows and rows[kid]["recoveries"] == 6

            eventually(counted, "six recoveries in /status")
            document = status(server)
            assert "203.0.113.9" not in json.dumps(document)
            usage = document["usage"]
            assert isinstance(usage, dict)
            assert usage["source"] == ("ledger" if extra else "metrics")


def recorded(state: Path, kid: str) -> int:
    """The ledger's count for a key (0 before the first flush has written its row)."""
    records = ledger.read(ledger.path_in(state)) if ledger.path_in(state).exists() else {}
    return records[kid].recoveries if kid in records else 0


def _source(name: str, **seen: Seen) -> Source:
    return Source(name, dict(seen))


def test_judge() -> None:
    now = 1000 * DAY
    long_watched = now - 100 * DAY
    idle = Seen("k", "hidden", 4, now - 40 * DAY, long_watched)
    used = Seen("k", "hidden", 5, now - 2 * DAY, long_watched)
    young = Seen("k", "hidden", 0, None, now - 3 * DAY)
    assert judge(["k"], [_source("a", k=idle)], 30, now)[0].idle
    assert judge(["k"], [_source("a", k=idle), _source("b", k=idle)], 30, now)[0].idle
    refused = judge(["k"], [_source("a", k=idle), _source("b", k=used)], 30, now)[0]
    assert not refused.idle and "b: last recovery" in refused.reasons[0] and "5 recorded" in refused.reasons[0]
    assert "watched it only since" in judge(["k"], [_source("a", k=young)], 30, now)[0].reasons[0]
    assert "no record" in judge(["k"], [_source("a")], 30, now)[0].reasons[0]
    unreachable = Source("c", error="no usage from c: refused")
    assert judge(["k"], [_source("a", k=idle), unreachable], 30, now)[0].reasons == ("no usage from c: refused",)
    assert judge(["k"], [_source("a", k=used)], 1, now)[0].idle  # --min-idle 1


def cli(*args: str, now: float | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if now is not None:
        env["TANG_SERVER_NOW"] = str(now)
    return subprocess.run([str(BIN / "tang-server"), *args], capture_output=True, text=True, env=env, timeout=60)


def test_delete_hidden_is_guarded_by_the_ledger_and_the_fleet(keys: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    old = exchange_kid(keys)
    with our_server(keys, tmp_path / "server.log", "--state-dir", str(state), *FAST_FLUSH) as server:
        for _ in range(3):
            recover(server, old)
        keyfiles.rotate(keys)
        eventually(lambda: any(k.kid == old for k in load_keyset(keys).hidden), "the old key hidden")
        recover(server, old)  # a machine not re-bound yet
        eventually(lambda: recorded(state, old) == 4, "four recoveries recorded")

        refused = cli("delete-hidden", str(keys), f"--kid={old}", "--state-dir", str(state), "--fleet", server.url)
        assert refused.returncode == 1, refused
        assert f"refusing to delete {old}" in refused.stderr and "4 recorded" in refused.stderr
        assert "nothing deleted" in refused.stderr
        assert load_keyset(keys).find(old) is not None

        usage = cli("keys", "usage", "--state-dir", str(state), server.url)
        assert usage.returncode == 0, usage
        row = next(line for line in usage.stdout.splitlines() if line.startswith(old))
        assert "hidden" in row and "HIDDEN, USED WITHIN 30 DAYS" in row
        assert re.search(r" 4 +4 +8 +HIDDEN", row), row  # the ledger, the replica, and the total

        # 31 days later, with nothing since: the ledger and the replica (which shows its ledger) say idle.
        later = time.time() + 31 * DAY
        young = cli("delete-hidden", str(keys), f"--kid={old}", "--state-dir", str(state), "--fleet", server.url,
                    now=later)  # fmt: skip
        assert young.returncode == 0, young.stderr
        assert f"deleted {old}" in young.stdout


def test_delete_hidden_force_and_no_data(keys: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    keyfiles.rotate(keys)
    hidden = [key.kid for key in load_keyset(keys).hidden]
    missing = cli("delete-hidden", str(keys), "--all", "--state-dir", str(state))
    assert missing.returncode == 1 and "no ledger at" in missing.stderr
    forced = cli("delete-hidden", str(keys), "--all", "--state-dir", str(state), "--force")
    assert forced.returncode == 0, forced.stderr
    assert "deleting anyway (--force)" in forced.stderr
    assert all(f"deleted {kid}" in forced.stdout for kid in hidden)
    keyfiles.rotate(keys)
    blind = cli("delete-hidden", str(keys), "--all")
    assert blind.returncode == 0 and "no usage data to judge by" in blind.stderr
