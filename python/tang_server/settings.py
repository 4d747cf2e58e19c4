"""Server settings: one frozen object, passed to worker processes through one environment variable."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

#: Worker processes are started by uvicorn from an import string, so they read their settings from here.
ENVIRONMENT_VARIABLE = "TANG_SERVER_SETTINGS"
#: prometheus-client's own variable: where worker processes keep their metric files.
MULTIPROCESS_ENVIRONMENT = "PROMETHEUS_MULTIPROC_DIR"

DEFAULT_PORT = 7500
DEFAULT_MAX_TARGET_BYTES = 4096  # a request target this long or longer is 414, as in the reference
DEFAULT_MAX_BODY_BYTES = 65536  # a body this long or longer is 413, as in the reference
#: Seconds between SIGTERM and closing the listener, serving but not ready, so load balancers take the replica out.
DEFAULT_DRAIN_SECONDS = 5.0
#: Recovery usage (metrics, ledger) is gathered in memory and written out this often, never per request.
DEFAULT_USAGE_FLUSH_SECONDS = 5.0
#: Distinct client addresses the ledger keeps per key (the most recent ones).
DEFAULT_LEDGER_CLIENTS = 5
#: A key absent from the key set this long loses its ledger row (and its client addresses).
DEFAULT_LEDGER_RETENTION_DAYS = 90.0
#: `delete-hidden` refuses a key that answered a recovery more recently than this.
DEFAULT_MIN_IDLE_DAYS = 30.0


@dataclass(frozen=True)
class Settings:
    keys_dir: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    uds: str | None = None
    workers: int = 1
    #: Threads per worker for the /rec exchange; 0 runs it on the event loop (measured faster: bench/README).
    exchange_threads: int = 0
    #: Moves the Tang routes under `/{prefix}` (tangd -e). Empty: at the root.
    prefix: str = ""
    #: Generate a pair when the directory has no visible key (the reference's behaviour; off for replicas).
    auto_keygen: bool = True
    max_target_bytes: int = DEFAULT_MAX_TARGET_BYTES
    #: A whole request must arrive within this many seconds; its headers within this many bytes.
    request_timeout: float = 10.0
    max_header_bytes: int = 32768
    #: Idle kept-alive connections are closed after this many seconds.
    keep_alive_seconds: float = 5.0
    #: A /rec that queued longer than this (ms) is answered 503 + Retry-After at once; 0 turns it off.
    max_queue_ms: float = 1000.0
    #: Connections (and requests) at once per worker beyond which new requests get 503; None: unlimited.
    max_connections: int | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    #: On SIGTERM or SIGINT: not ready but serving for this long, then the listener closes and what was received
    #: is answered (see `server.py`). 0: close the listener at once.
    drain_seconds: float = DEFAULT_DRAIN_SECONDS
    #: Re-read the directory this often even without inotify events (network file systems send none).
    recheck_seconds: float = 30.0
    #: Liveness (the process answers) and readiness (a usable key set is loaded); exact paths, never prefixed.
    health_path: str = "/healthz"
    ready_path: str = "/readyz"
    #: Prometheus metrics and the key-set status (JSON, public information only); exact paths, never prefixed.
    metrics_path: str = "/metrics"
    status_path: str = "/status"
    #: Where the workers' metrics files live (emptied at start); None: a fresh temporary directory.
    metrics_dir: str | None = None
    log_level: str = "info"
    access_log: bool = True
    access_log_format: str = "plain"
    #: Peers (CIDR) whose X-Forwarded-For is believed for the client's address (access log and access policy).
    trusted_proxies: tuple[str, ...] = ()
    #: When not empty, only clients in these networks (CIDR) may POST /rec, or GET /adv; others get 403.
    allow_recovery: tuple[str, ...] = ()
    allow_advertisement: tuple[str, ...] = ()
    #: Where the recovery ledger lives (`ledger.py`); None: no ledger (usage is still counted in the metrics).
    state_dir: str | None = None
    ledger_clients: int = DEFAULT_LEDGER_CLIENTS
    ledger_retention_days: float = DEFAULT_LEDGER_RETENTION_DAYS
    usage_flush_seconds: float = DEFAULT_USAGE_FLUSH_SECONDS
    #: The Unix control socket on which `tangd` hands its connection over (`handoff.py`); None: the default path
    #: derived from the key directory, which `tangd` finds by itself; "": take no hand-overs.
    handoff_socket: str | None = None

    def to_environment(self) -> str:
        values = dataclasses.asdict(self)
        values["keys_dir"] = str(self.keys_dir)
        return json.dumps(values)

    @classmethod
    def from_environment(cls) -> Settings:
        values = json.loads(os.environ[ENVIRONMENT_VARIABLE])
        values["keys_dir"] = Path(values["keys_dir"])
        for name in ("trusted_proxies", "allow_recovery", "allow_advertisement"):
            values[name] = tuple(values[name])
        return cls(**values)
