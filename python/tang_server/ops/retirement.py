"""Whether hidden keys may be deleted, judged by their recorded use: `keys usage` and `delete-hidden`'s guard.

Usage comes from sources: the local ledger (`--state-dir`) and replicas (`/status`, which shows the replica's
ledger or, without one, its metrics since its workers started). A key may be deleted only when every source
has watched it for at least `min_idle` and none saw it answer a recovery within `min_idle`: a source that only
started watching recently cannot vouch that nobody used the key before. A replica that cannot be reached is a
reason to refuse too.

"Now" is `TANG_SERVER_NOW` (seconds since the epoch) when set, so that tests inject time instead of waiting.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tang_server.ops import ledger

NOW_ENVIRONMENT = "TANG_SERVER_NOW"
DAY = 86400.0


def now() -> float:
    injected = os.environ.get(NOW_ENVIRONMENT)
    return float(injected) if injected else time.time()


@dataclass(frozen=True)
class Seen:
    """One source's record of one key."""

    kid: str
    visibility: str  # visible, hidden, or absent (in the ledger, no longer in the key set)
    recoveries: int
    last_recovery: float | None
    #: Since when this source knows the key's usage.
    since: float
    hidden_since: float | None = None


@dataclass
class Source:
    name: str
    keys: dict[str, Seen] = field(default_factory=dict)
    error: str | None = None


def local_source(state_dir: Path) -> Source:
    source = Source(f"ledger {state_dir}")
    path = ledger.path_in(state_dir)
    if not path.exists():
        source.error = f"no ledger at {path}"
        return source
    try:
        records = ledger.read(path)
    except Exception as exc:  # sqlite3.Error and OSError: say it, refuse to judge by it
        source.error = f"cannot read {path}: {exc}"
        return source
    for kid, record in records.items():
        visibility = "hidden" if record.hidden else "visible"
        source.keys[kid] = Seen(kid, visibility, record.recoveries, record.last_recovery, record.first_seen,
                                record.hidden_since)  # fmt: skip
    return source


def replica_sources(targets: Sequence[str], timeout: float = 5.0) -> list[Source]:
    from tang_server.ops.fleet import replica_urls

    return [replica_source(url, timeout) for url in replica_urls(targets)]


def replica_source(url: str, timeout: float = 5.0) -> Source:
    source = Source(url)
    try:
        with urllib.request.urlopen(f"{url}/status", timeout=timeout) as response:  # noqa: S310
            status = json.loads(response.read())
        rows = status["usage"]["keys"]
        for row in rows:
            source.keys[row["kid"]] = Seen(row["kid"], row["visibility"], int(row["recoveries"]),
                                           row["last_recovery"], float(row["since"]), row["hidden_since"])  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as exc:
        source.error = f"no usage from {url}: {exc}"
    return source


@dataclass(frozen=True)
class Verdict:
    kid: str
    #: Why the key may not be deleted; empty when every source shows it idle for long enough.
    reasons: tuple[str, ...]

    @property
    def idle(self) -> bool:
        return not self.reasons


def judge(kids: Iterable[str], sources: Sequence[Source], min_idle_days: float, at: float) -> list[Verdict]:
    """Each key's verdict: deletable only when every source watched it `min_idle_days` without a recovery."""
    horizon = at - min_idle_days * DAY
    verdicts = []
    for kid in kids:
        reasons = []
        for source in sources:
            if source.error is not None:
                reasons.append(source.error)
                continue
            seen = source.keys.get(kid)
            if seen is None:
                reasons.append(f"{source.name} has no record of it")
            elif seen.last_recovery is not None and seen.last_recovery > horizon:
                reasons.append(
                    f"{source.name}: last recovery {when(seen.last_recovery, at)}, {seen.recoveries} recorded"
                )
            elif seen.since > horizon:
                reasons.append(f"{source.name} has watched it only since {when(seen.since, at)}")
        verdicts.append(Verdict(kid, tuple(reasons)))
    return verdicts


def when(moment: float | None, at: float) -> str:
    if moment is None:
        return "never"
    stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(moment))
    return f"{stamp} ({(at - moment) / DAY:.1f} days ago)"


def usage_table(sources: Sequence[Source], within_days: float, at: float) -> str:
    """`keys usage`: per key, visibility, known since, last recovery, counts per source and in total, and a flag
    for hidden keys used within `within_days`."""
    horizon = at - within_days * DAY
    kids = sorted(set().union(*(source.keys.keys() for source in sources)))
    lines = []
    for source in sources:
        if source.error is not None:
            lines.append(f"UNAVAILABLE {source.error}")
    names = [source.name for source in sources if source.error is None]
    rows = [["KID", "VISIBILITY", "KNOWN SINCE", "LAST RECOVERY", *names, "TOTAL", "FLAG"]]
    for kid in kids:
        seen = [source.keys[kid] for source in sources if kid in source.keys]
        visibilities = sorted({s.visibility for s in seen})
        lasts = [s.last_recovery for s in seen if s.last_recovery is not None]
        last = max(lasts) if lasts else None
        hidden = "hidden" in visibilities
        flag = f"HIDDEN, USED WITHIN {within_days:g} DAYS" if hidden and last is not None and last > horizon else ""
        counts = [str(source.keys[kid].recoveries if kid in source.keys else "-") for source in sources
                  if source.error is None]  # fmt: skip
        rows.append([
            kid,
            "/".join(visibilities),
            time.strftime("%Y-%m-%d", time.gmtime(min(s.since for s in seen))),
            when(last, at),
            *counts,
            str(sum(s.recoveries for s in seen)),
            flag,
        ])  # fmt: skip
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    if not kids:
        lines.append("no usage recorded")
    return "\n".join(lines)


def deletion_candidates(directory: Path, key_ids: list[str] | None) -> list[str]:
    """The S256 ids of the hidden keys `delete-hidden` was asked to delete (ids it cannot find are left to it)."""
    from tang_server.keys.keyfiles import STAGED_PREFIX
    from tang_server.keys.keyset import load_keyset

    keyset = load_keyset(directory)
    if key_ids is None:
        return [key.kid for key in keyset.hidden if not key.name.startswith(STAGED_PREFIX)]
    found = [keyset.find(kid) for kid in key_ids]
    return [key.kid for key in found if key is not None and key.hidden]


def guard_deletion(args: argparse.Namespace) -> bool:
    """`delete-hidden`'s guard: True when it may go on. Says why it refuses, or that it cannot judge."""
    sources = [local_source(args.state_dir)] if args.state_dir is not None else []
    sources += replica_sources(args.fleet) if args.fleet else []
    if not sources:
        print("tang-server delete-hidden: no usage data to judge by (neither --state-dir nor --fleet): cannot tell "
              "whether machines still use these keys", file=sys.stderr)  # fmt: skip
        return True
    at = now()
    busy = [v for v in judge(deletion_candidates(args.directory, None if args.all else args.kid), sources,
                             args.min_idle, at) if not v.idle]  # fmt: skip
    for verdict in busy:
        action = "deleting anyway (--force)" if args.force else "refusing to delete"
        print(f"{action} {verdict.kid}: {'; '.join(verdict.reasons)}", file=sys.stderr)
    if busy and not args.force:
        print(f"tang-server delete-hidden: nothing deleted; {len(busy)} key(s) not shown idle for "
              f"{args.min_idle:g} days (machines bound to them could not unlock). Re-bind them, or use --force",
              file=sys.stderr)  # fmt: skip
        return False
    return True


def usage_command(args: argparse.Namespace) -> int:
    """`tang-server keys usage`."""
    sources = [local_source(args.state_dir)] if args.state_dir is not None else []
    sources += replica_sources(args.targets) if args.targets else []
    if not sources:
        print("tang-server keys usage: give --state-dir DIR (a ledger) or replica URLs", file=sys.stderr)
        return 2
    print(usage_table(sources, args.within, now()))
    return 1 if any(source.error for source in sources) else 0
