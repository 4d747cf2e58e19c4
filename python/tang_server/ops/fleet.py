"""The fleet view: which key set every worker of every replica serves, and waiting until they all agree.

A target is a URL (`http://host:port`) or a DNS name that resolves to every replica (a Kubernetes headless
Service): each address it resolves to is one replica. A replica's `/metrics` carries `tang_keyset_info{digest,pid}`
for each of its worker processes (merged by the server), so one scrape shows every worker, whichever worker
answers it; `/status` adds the key ids of the worker that answers.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Replica:
    url: str
    #: The digest each worker process serves, by pid.
    workers: dict[str, str] = field(default_factory=dict)
    visible: list[str] = field(default_factory=list)
    hidden: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def digests(self) -> set[str]:
        return set(self.workers.values())


def replica_urls(targets: Iterable[str], default_port: int = 7500) -> list[str]:
    """Every replica behind the targets: a URL whose host resolves to several addresses is several replicas."""
    urls = []
    for target in targets:
        parsed = urllib.parse.urlsplit(target if "://" in target else f"http://{target}")
        host, port = parsed.hostname or "", parsed.port or default_port
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror:
            urls.append(f"{parsed.scheme}://{parsed.netloc}")  # reported as unreachable by `observe`
            continue
        addresses = sorted({str(info[4][0]) for info in infos})
        for address in addresses:
            shown = f"[{address}]" if ":" in address else address
            urls.append(f"{parsed.scheme}://{shown}:{port}")
    return urls


def observe(url: str, timeout: float = 5.0) -> Replica:
    replica = Replica(url)
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=timeout) as response:  # noqa: S310
            text = response.read().decode()
        with urllib.request.urlopen(f"{url}/status", timeout=timeout) as response:  # noqa: S310
            status = json.loads(response.read())
    except (OSError, ValueError) as exc:
        replica.error = str(exc)
        return replica
    for family in text_string_to_metric_families(text):
        if family.name == "tang_keyset_info":
            for sample in family.samples:
                if sample.value == 1:
                    replica.workers[sample.labels.get("pid", "?")] = sample.labels["digest"]
    replica.visible = [key["kid"] for key in status["visible"]]
    replica.hidden = [key["kid"] for key in status["hidden"]]
    return replica


def survey(targets: Iterable[str]) -> list[Replica]:
    return [observe(url) for url in replica_urls(targets)]


def agreed_digest(replicas: list[Replica]) -> str | None:
    """The one digest every worker of every replica serves, or None (divergence, or a replica unreachable)."""
    if not replicas or any(r.error or not r.workers for r in replicas):
        return None
    digests = set().union(*(r.digests for r in replicas))
    return digests.pop() if len(digests) == 1 else None


def report(replicas: list[Replica], expected: str | None = None) -> str:
    lines = []
    for replica in replicas:
        if replica.error:
            lines.append(f"{replica.url}  UNREACHABLE  {replica.error}")
            continue
        for pid, digest in sorted(replica.workers.items()):
            mark = "" if expected is None or digest == expected else "  <- lagging"
            lines.append(f"{replica.url}  pid {pid}  {digest[:16]}{mark}")
        lines.append(f"{replica.url}  visible {' '.join(replica.visible)}  hidden {' '.join(replica.hidden) or '-'}")
    agreed = agreed_digest(replicas)
    lines.append(f"agreed on {agreed[:16]}" if agreed else "DIVERGED or incomplete")
    return "\n".join(lines)


def wait(
    targets: list[str],
    digest: str,
    timeout: float,
    interval: float = 1.0,
    say: Callable[[str], None] = print,
) -> bool:
    """Poll until every worker of every replica serves `digest`; False (with the laggards said) on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        replicas = survey(targets)
        if agreed_digest(replicas) == digest:
            say(f"all {sum(len(r.workers) for r in replicas)} workers of {len(replicas)} replicas serve {digest[:16]}")
            return True
        if time.monotonic() >= deadline:
            say(f"timed out waiting for {digest[:16]}; laggards:")
            say(report(replicas, expected=digest))
            return False
        time.sleep(interval)
