"""The operator's story with real clevis clients: bind, rotate, re-bind some, see who still uses the old key,
and retire it only when it is idle."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from tang_server.keys.keyset import load_keyset
from tang_server.ops import ledger

from .luks import clevis_decrypt, clevis_encrypt, protected_header, tool_env
from .support import our_server, require_tools
from .test_key_usage import cli, recorded, sample, scrape, status
from .test_ledger import FAST_FLUSH, eventually
from .test_prometheus import prometheus_scraping, query

UNKNOWN_KEY_ALERT = 'ALERTS{alertname="TangRecoveryUnknownKey",alertstate="firing"}'


def scraped_since(prometheus: str, moment: float) -> bool:
    """Prometheus has a sample of the unknown-key counter taken after `moment` (so the rule saw the count before)."""
    result = query(prometheus, "timestamp(tang_recovery_unknown_key_total)")
    values = [row["value"] for row in result]
    return bool(values) and all(isinstance(value, list) and float(value[1]) > moment for value in values)


def test_old_key_usage_is_exact_and_guards_its_deletion(keys: Path, tmp_path: Path) -> None:
    require_tools("clevis", "jose")
    env = tool_env(tmp_path)
    state = tmp_path / "state"
    with (
        our_server(keys, tmp_path / "server.log", "--state-dir", str(state), *FAST_FLUSH, workers=2) as server,
        prometheus_scraping(server, tmp_path, alert_rules=True) as prometheus,
    ):
        bound = [clevis_encrypt(server.url, f"disk {n}".encode(), env) for n in range(3)]
        old = protected_header(bound[0].decode())["clevis"]["tang"]["adv"]["keys"]
        old_exchange = next(k for k in load_keyset(keys).visible if k.kind.value == "exchange").kid
        assert any(key.get("key_ops") == ["deriveKey"] for key in old)
        for jwe in bound:  # every machine boots once
            assert clevis_decrypt(jwe, env).returncode == 0

        rotated = cli("rotate", str(keys))
        assert rotated.returncode == 0, rotated.stderr
        eventually(lambda: old_exchange in {key["kid"] for key in status(server)["hidden"]}, "the rotation served")

        # Machines 0 and 1 re-bind (decrypt with the old key, encrypt with the new); machine 2 does not.
        for n in (0, 1):
            secret = clevis_decrypt(bound[n], env)
            assert secret.returncode == 0
            bound[n] = clevis_encrypt(server.url, secret.stdout, env)
        before_last = time.time()
        assert clevis_decrypt(bound[2], env).returncode == 0  # machine 2 boots, still with the old key
        for jwe in bound[:2]:
            assert clevis_decrypt(jwe, env).returncode == 0  # the re-bound ones use the new key

        eventually(lambda: recorded(state, old_exchange) == 6, "six recoveries with the old key")
        record = ledger.read(ledger.path_in(state))[old_exchange]
        assert record.hidden and record.last_recovery is not None and record.last_recovery >= before_last
        new_exchange = next(k for k in load_keyset(keys).visible if k.kind.value == "exchange").kid
        eventually(lambda: recorded(state, new_exchange) == 2, "two recoveries with the new key")

        usage = cli("keys", "usage", "--state-dir", str(state))
        row = next(line for line in usage.stdout.splitlines() if line.startswith(old_exchange))
        assert row.split()[1] == "hidden" and re.search(r" 6 +6 +HIDDEN, USED WITHIN 30 DAYS$", row), row

        refused = cli("delete-hidden", str(keys), "--all", "--state-dir", str(state), "--fleet", server.url)
        assert refused.returncode == 1 and f"refusing to delete {old_exchange}" in refused.stderr
        assert "6 recorded" in refused.stderr
        assert load_keyset(keys).find(old_exchange) is not None

        # A month later (time injected), nobody has used it since: idle by the ledger and by the replica.
        month_later = time.time() + 31 * 86400
        deleted = cli("delete-hidden", str(keys), "--all", "--state-dir", str(state), "--fleet", server.url,
                      now=month_later)  # fmt: skip
        assert deleted.returncode == 0, deleted.stderr
        assert f"deleted {old_exchange}" in deleted.stdout
        eventually(lambda: old_exchange not in json.dumps(status(server)["hidden"]), "the deletion served")

        # Machine 2 was never re-bound: it can no longer unlock, and the server counts it. The shipped alert rule,
        # evaluated by a real Prometheus scraping this server, is quiet until then and fires after.
        unknown_before = sample(scrape(server), "tang_recovery_unknown_key_total") or 0
        scraped_now = time.time()
        eventually(lambda: scraped_since(prometheus, scraped_now), "Prometheus scraping the server")
        assert query(prometheus, UNKNOWN_KEY_ALERT) == []
        assert clevis_decrypt(bound[2], env).returncode != 0
        eventually(lambda: sample(scrape(server), "tang_recovery_unknown_key_total") == unknown_before + 1,
                   "the recovery for the deleted key counted")  # fmt: skip
        eventually(lambda: query(prometheus, UNKNOWN_KEY_ALERT) != [], "TangRecoveryUnknownKey firing")
    assert f'"POST /rec/{old_exchange} HTTP/1.1" 404' in server.log_text()
