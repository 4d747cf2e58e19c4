"""Server settings: one frozen object, the one source of every `serve` option, its default and its help.

The command line is derived from the fields (`cli.add_setting_options`): a field's default is its option's
default, its metadata the option's help and parsing. Worker processes receive the object through one environment
variable.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tang_server.serving import cpus

#: Worker processes are started by uvicorn from an import string, so they read their settings from here.
ENVIRONMENT_VARIABLE = "TANG_SERVER_SETTINGS"
#: prometheus-client's own variable: where worker processes keep their metric files.
MULTIPROCESS_ENVIRONMENT = "PROMETHEUS_MULTIPROC_DIR"

DEFAULT_PORT = 7500
#: `delete-hidden` refuses a key that answered a recovery more recently than this (not a `serve` setting).
DEFAULT_MIN_IDLE_DAYS = 30.0


# The command line's parsers. argparse and ipaddress are imported only when one runs: `tangd` in inetd mode imports
# this module for every connection it serves itself, and must start fast.


def _invalid(message: str) -> Exception:
    import argparse

    return argparse.ArgumentTypeError(message)


def port_number(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise _invalid(f"invalid port: {text}")
    return port


def network(text: str) -> str:
    import ipaddress

    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise _invalid(str(exc)) from exc
    return text


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise _invalid(f"must be at least 1: {text}")
    return value


def non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise _invalid(f"must be 0 or more: {text}")
    return value


def count(text: str) -> int:
    return int(non_negative(text))


@dataclass(frozen=True)
class Computed:
    """A default computed each time settings are made (from the machine), rather than written here."""

    factory: Callable[[], Any]


def option(default: Any, description: str, parse: Callable[[str], Any] | None = None, **argparse_options: Any) -> Any:
    """A setting with its command-line option: `parse` converts the text, `argparse_options` go to add_argument
    (`flag` names the option when it is not the field's name, `cli_default` overrides the default there,
    `switch` makes it --NAME/--no-NAME)."""
    metadata = {"help": description, "parse": parse, "argparse": argparse_options}
    if isinstance(default, Computed):
        return field(default_factory=default.factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    keys_dir: Path = field(metadata={"help": "the key directory (*.jwk files)", "parse": Path, "argparse": {}})
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(DEFAULT_PORT, "TCP port", port_number)
    uds: str | None = option(None, "listen on this Unix socket instead of TCP")
    workers: int = option(
        Computed(cpus.usable_cpus),
        "worker processes; by default one per CPU this process may use: the CPUs of its affinity (taskset, "
        "CPUAffinity=), at most its cgroup's CPU quota (a container's CPU limit, CPUQuota=) rounded up",
        positive,
    )
    exchange_threads: int = option(
        0, "threads per worker for the /rec multiplication (0: on the event loop; measured faster: bench/README)", int
    )
    prefix: str = option("", "serve the Tang routes under /PREFIX (tangd -e)")
    auto_keygen: bool = option(
        True,
        "generate a key pair when the directory has no visible key, as the reference (off with --fleet: replicas "
        "would each invent keys)",
        switch=True,
        cli_default=None,  # unset: on, unless --fleet (`cli.py` refuses --fleet with --auto-keygen)
    )
    max_target_bytes: int = option(4096, "a request target this long or longer is 414, as in the reference", positive)
    request_timeout: float = option(10.0, "seconds for a whole request to arrive (else 408)", non_negative)
    max_header_bytes: int = option(32768, "header bytes beyond which a request is 431", positive)
    keep_alive_seconds: float = option(5.0, "idle kept-alive connections are closed after this", non_negative)
    max_queue_ms: float = option(
        1000.0, "a /rec queued longer than this gets 503 + Retry-After at once (0: off)", non_negative
    )
    max_connections: int | None = option(None, "connections per worker beyond which requests get 503", positive)
    max_body_bytes: int = option(65536, "a body this long or longer is 413, as in the reference", positive)
    drain_seconds: float = option(
        5.0,
        "on SIGTERM, serve this long while not ready (load balancers take the replica out), then stop accepting "
        "and answer what was received (0: at once)",
        non_negative,
    )
    recheck_seconds: float = option(
        30.0, "re-read the key directory this often even without inotify events", non_negative
    )
    health_path: str = option("/healthz", "liveness endpoint (exact path, never prefixed)")
    ready_path: str = option("/readyz", "readiness endpoint: a usable key set is loaded and not draining")
    metrics_path: str = option("/metrics", "Prometheus endpoint")
    status_path: str = option("/status", "key-set status JSON (public information only)")
    metrics_dir: str | None = option(
        None, "directory for the workers' metrics files, emptied at start (default: a temporary one)"
    )
    log_level: str = option("info", "log level", choices=["debug", "info", "warning", "error"])
    access_log: bool = option(True, "one line per answered request", switch=True)
    access_log_format: str = option("plain", "access log line format", choices=["plain", "json"])
    trusted_proxies: tuple[str, ...] = option(
        (), "CIDR of a proxy whose X-Forwarded-For names the client (repeatable)", network, flag="--trusted-proxy"
    )
    allow_recovery: tuple[str, ...] = option((), "only clients in this CIDR may POST /rec (repeatable)", network)
    allow_advertisement: tuple[str, ...] = option((), "only clients in this CIDR may GET /adv (repeatable)", network)
    state_dir: str | None = option(
        None, "keep a ledger of which keys answer recoveries here (SQLite; default: none, no ledger)"
    )
    ledger_clients: int = option(5, "client addresses the ledger keeps per key, the most recent (0: none)", count)
    ledger_retention_days: float = option(90.0, "forget a key absent from the key set this long", non_negative)
    usage_flush_seconds: float = option(
        5.0, "write recovery usage to the metrics and the ledger this often (never per request)", non_negative
    )
    handoff_socket: str | None = option(
        None,
        "Unix socket on which tangd (inetd mode) hands its connections over (default: one derived from the key "
        "directory, which tangd finds by itself; `none`: off)",
        lambda text: "" if text == "none" else text,
        metavar="PATH|none",
    )

    def to_environment(self) -> str:
        values = dataclasses.asdict(self)
        values["keys_dir"] = str(self.keys_dir)
        return json.dumps(values)

    @classmethod
    def from_environment(cls) -> Settings:
        values = json.loads(os.environ[ENVIRONMENT_VARIABLE])
        values["keys_dir"] = Path(values["keys_dir"])
        for setting in dataclasses.fields(cls):
            if isinstance(setting.default, tuple):
                values[setting.name] = tuple(values[setting.name])
        return cls(**values)
