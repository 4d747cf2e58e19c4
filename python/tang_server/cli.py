"""`tang-server`: serve, and manage a key directory."""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__, client, keyfiles, server
from .keyset import load_keyset
from .settings import (
    DEFAULT_DRAIN_SECONDS,
    DEFAULT_LEDGER_CLIENTS,
    DEFAULT_LEDGER_RETENTION_DAYS,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_TARGET_BYTES,
    DEFAULT_MIN_IDLE_DAYS,
    DEFAULT_PORT,
    DEFAULT_USAGE_FLUSH_SECONDS,
    Settings,
)


def port_number(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"invalid port: {text}")
    return port


def network(text: str) -> str:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text}")
    return value


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="tang-server", description=__doc__)
    top.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = top.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the Tang protocol")
    serve.add_argument("--keys-dir", type=Path, required=True, help="the key directory (*.jwk files)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=port_number, default=DEFAULT_PORT, help="TCP port (default: %(default)s)")
    serve.add_argument("--uds", help="listen on this Unix socket instead of TCP")
    serve.add_argument("--workers", type=positive, default=1, help="worker processes (default: %(default)s)")
    serve.add_argument(
        "--exchange-threads",
        type=int,
        default=0,
        help="threads per worker for the /rec multiplication (default 0: on the event loop; measured faster)",
    )
    serve.add_argument("--prefix", default="", help="serve the Tang routes under /PREFIX (tangd -e)")
    serve.add_argument(
        "--auto-keygen",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="generate a key pair when the directory has no visible key (default: on, off with --fleet)",
    )
    serve.add_argument(
        "--fleet",
        action="store_true",
        help="one of several replicas sharing keys: never generate keys (each replica would invent its own)",
    )
    serve.add_argument(
        "--recheck-seconds",
        type=float,
        default=30.0,
        help="re-read the key directory this often even without inotify events (default: %(default)s)",
    )
    serve.add_argument("--health-path", default="/healthz", help="liveness endpoint (default: %(default)s)")
    serve.add_argument("--ready-path", default="/readyz", help="readiness endpoint (default: %(default)s)")
    serve.add_argument(
        "--allow-recovery",
        action="append",
        default=[],
        type=network,
        help="only clients in this CIDR may POST /rec (repeatable; default: everybody)",
    )
    serve.add_argument(
        "--allow-advertisement",
        action="append",
        default=[],
        type=network,
        help="only clients in this CIDR may GET /adv (repeatable; default: everybody)",
    )
    serve.add_argument("--metrics-path", default="/metrics", help="Prometheus endpoint (default: %(default)s)")
    serve.add_argument("--status-path", default="/status", help="key-set status JSON (default: %(default)s)")
    serve.add_argument("--metrics-dir", help="directory for the workers' metrics files (default: a temporary one)")
    serve.add_argument("--max-target-bytes", type=positive, default=DEFAULT_MAX_TARGET_BYTES)
    serve.add_argument("--request-timeout", type=float, default=10.0, help="seconds for a whole request to arrive")
    serve.add_argument("--max-header-bytes", type=positive, default=32768)
    serve.add_argument("--keep-alive-seconds", type=float, default=5.0, help="idle kept-alive connections close")
    serve.add_argument(
        "--max-queue-ms",
        type=float,
        default=1000.0,
        help="a /rec queued longer than this gets 503 + Retry-After at once (0: off; default %(default)s)",
    )
    serve.add_argument("--max-connections", type=positive, help="per worker; beyond it requests get 503")
    serve.add_argument("--max-body-bytes", type=positive, default=DEFAULT_MAX_BODY_BYTES)
    serve.add_argument(
        "--drain-seconds",
        type=non_negative,
        default=DEFAULT_DRAIN_SECONDS,
        help="on SIGTERM, serve this long while not ready (load balancers take the replica out), then stop "
        "accepting and answer what was received (default: %(default)s)",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True)
    serve.add_argument("--access-log-format", choices=["plain", "json"], default="plain")
    serve.add_argument(
        "--trusted-proxy",
        action="append",
        default=[],
        type=network,
        help="CIDR of a proxy whose X-Forwarded-For names the client in the access log (repeatable)",
    )
    serve.add_argument(
        "--state-dir",
        help="keep a ledger of which keys answer recoveries here (SQLite; default: none, no ledger)",
    )
    serve.add_argument(
        "--ledger-clients",
        type=lambda text: int(non_negative(text)),
        default=DEFAULT_LEDGER_CLIENTS,
        help="client addresses the ledger keeps per key, the most recent (0: none; default: %(default)s)",
    )
    serve.add_argument(
        "--ledger-retention-days",
        type=non_negative,
        default=DEFAULT_LEDGER_RETENTION_DAYS,
        help="forget a key absent from the key set this long (default: %(default)s)",
    )
    serve.add_argument(
        "--usage-flush-seconds",
        type=non_negative,
        default=DEFAULT_USAGE_FLUSH_SECONDS,
        help="write recovery usage to the metrics and the ledger this often (default: %(default)s)",
    )
    serve.add_argument(
        "--handoff-socket",
        metavar="PATH|none",
        help="Unix socket on which tangd (inetd mode) hands its connections over (default: one derived from the "
        "key directory, which tangd finds by itself; `none`: off)",
    )

    keygen = commands.add_parser("keygen", help="write a new signing and exchange key pair (like tangd-keygen)")
    keygen.add_argument("directory", type=Path)

    rotate = commands.add_parser(
        "rotate",
        help="write a new pair and hide every old visible key (like tangd-rotate-keys; never deletes)",
        description="Without options, rotate at once (single host). For replicas sharing keys, rotate in two "
        "phases: --stage adds the new pair hidden; once every replica serves it, --promote makes it visible and "
        "hides the old pair.",
    )
    rotate.add_argument("directory", type=Path)
    phase = rotate.add_mutually_exclusive_group()
    phase.add_argument("--stage", action="store_true", help="phase one: add a new pair as hidden keys")
    phase.add_argument("--promote", action="store_true", help="phase two: un-hide the staged pair, hide the old")

    delete = commands.add_parser(
        "delete-hidden", help="delete hidden (rotated) keys: the machines bound to them can no longer unlock"
    )
    delete.add_argument("directory", type=Path)
    which = delete.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every hidden key except a staged pair")
    which.add_argument(
        "--kid", action="append", help="a hidden key's thumbprint (any hash), as --kid=KID (ids may start with -)"
    )
    delete.add_argument("--state-dir", type=Path, help="the local recovery ledger (serve --state-dir)")
    delete.add_argument("--fleet", action="extend", nargs="+", default=[], metavar="URL",
                        help="replicas (URLs or DNS names) whose usage must show the keys idle")  # fmt: skip
    delete.add_argument(
        "--min-idle",
        type=non_negative,
        default=DEFAULT_MIN_IDLE_DAYS,
        metavar="DAYS",
        help="refuse a key that answered a recovery within DAYS by the ledger or a replica (default: %(default)s)",
    )
    delete.add_argument("--force", action="store_true", help="delete even keys recently used or not known idle")

    keys = commands.add_parser("keys", help="which keys answer recoveries")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    usage = keys_commands.add_parser(
        "usage", help="per key: visibility, last recovery, counts per replica (and the local ledger) and in total"
    )
    usage.add_argument("--state-dir", type=Path, help="the local recovery ledger (serve --state-dir)")
    usage.add_argument("--within", type=non_negative, default=DEFAULT_MIN_IDLE_DAYS, metavar="DAYS",
                       help="flag hidden keys used within DAYS (default: %(default)s)")  # fmt: skip
    usage.add_argument("targets", nargs="*", help="replica URLs, or DNS names resolving to every replica")

    fleet = commands.add_parser("fleet", help="see and wait for the key sets of every replica and worker")
    fleet_commands = fleet.add_subparsers(dest="fleet_command", required=True)
    status = fleet_commands.add_parser("status", help="the digest and key ids each replica and worker serves")
    status.add_argument("targets", nargs="+", help="URLs, or DNS names resolving to every replica")
    waiting = fleet_commands.add_parser("wait", help="wait until every worker serves a digest")
    waiting.add_argument("--digest", required=True)
    waiting.add_argument("--timeout", type=float, default=300.0)
    waiting.add_argument("targets", nargs="+")
    rotation = fleet_commands.add_parser(
        "rotate", help="two-phase rotation of a key directory the replicas share, waiting for them between phases"
    )
    rotation.add_argument("--keys-dir", type=Path, required=True)
    rotation.add_argument("--timeout", type=float, default=300.0, help="per phase")
    rotation.add_argument("targets", nargs="+")

    kubernetes = commands.add_parser("kubernetes", help="keys in a Kubernetes Secret")
    kube_commands = kubernetes.add_subparsers(dest="kube_command", required=True)
    manifest = kube_commands.add_parser("secret", help="print a Secret manifest (JSON) holding a key directory")
    manifest.add_argument("directory", type=Path)
    manifest.add_argument("--name", required=True)
    manifest.add_argument("--namespace")
    in_cluster = kube_commands.add_parser(
        "rotate", help="two-phase rotation of the key Secret through the API, waiting for every pod between phases"
    )
    in_cluster.add_argument("--secret", required=True)
    in_cluster.add_argument("--namespace", required=True)
    in_cluster.add_argument("--service", required=True, help="the headless Service URL, e.g. http://tang-headless:7500")
    in_cluster.add_argument("--timeout", type=float, default=600.0, help="per phase")
    in_cluster.add_argument("--api-host", help="API server URL (default: in-cluster service account)")

    checking = commands.add_parser("check", help="verify the advertisement and perform real recoveries")
    checking.add_argument("url")
    checking.add_argument("--rounds", type=positive, default=3)
    checking.add_argument("--timeout", type=float, default=10.0)

    show = commands.add_parser(
        "show-keys", help="print the S256 thumbprints of the advertised signing keys (signatures verified first)"
    )
    show.add_argument("url", nargs="?", default=f"http://127.0.0.1:{DEFAULT_PORT}")
    return top


def rotate(args: argparse.Namespace) -> None:
    if args.stage:
        for path in keyfiles.stage(args.directory):
            print(f"staged   {path.name}")
        print("next: wait until every replica serves the new key-set digest, then run rotate --promote")
        return
    if args.promote:
        promoted, hidden = keyfiles.promote(args.directory)
    else:
        written, hidden = keyfiles.rotate(args.directory)
        promoted = [path.name for path in written]
    for name in promoted:
        print(f"visible  {name}")
    for name in hidden:
        print(f"hidden   {name} -> .{name}")


def fleet_command(args: argparse.Namespace) -> int:
    from . import fleet  # imports prometheus-client, which the serve path must import later

    if args.fleet_command == "status":
        replicas = fleet.survey(args.targets)
        print(fleet.report(replicas))
        return 0 if fleet.agreed_digest(replicas) else 1
    if args.fleet_command == "wait":
        return 0 if fleet.wait(args.targets, args.digest, args.timeout) else 1
    return two_phase_rotation(args, fleet.wait)


def kubernetes_command(args: argparse.Namespace) -> int:
    from . import fleet, kube

    if args.kube_command == "secret":
        print(json.dumps(kube.secret_manifest(args.directory, args.name, args.namespace), indent=2))
        return 0
    api = kube.core_api(args.api_host)
    try:
        done = kube.rotate_secret(
            api, args.secret, args.namespace, lambda digest: fleet.wait([args.service], digest, args.timeout)
        )
    except keyfiles.RotationError as exc:
        print(f"tang-server kubernetes rotate: {exc}", file=sys.stderr)
        return 1
    return 0 if done else 1


def two_phase_rotation(args: argparse.Namespace, wait: Callable[[list[str], str, float], bool]) -> int:
    """stage -> every worker serves it -> promote -> every worker serves it. Deleting old keys stays separate."""
    try:
        for path in keyfiles.stage(args.keys_dir):
            print(f"1/4 staged   {path.name}")
        staged = load_keyset(args.keys_dir).digest
        print(f"2/4 waiting for every replica to serve {staged[:16]}")
        if not wait(args.targets, staged, args.timeout):
            print("stopped before promoting: the staged keys are hidden, nothing is advertised yet", file=sys.stderr)
            return 1
        promoted, hidden = keyfiles.promote(args.keys_dir)
        print(f"3/4 promoted {' '.join(promoted)}; hidden {' '.join(hidden)}")
        final = load_keyset(args.keys_dir).digest
        print(f"4/4 waiting for every replica to serve {final[:16]}")
        if not wait(args.targets, final, args.timeout):
            return 1
    except keyfiles.RotationError as exc:
        print(f"tang-server fleet rotate: {exc}", file=sys.stderr)
        return 1
    print("done; delete the old hidden keys with `tang-server delete-hidden` once clients have re-bound")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "serve" and args.fleet and args.auto_keygen:
        print("tang-server serve: --auto-keygen is refused with --fleet: replicas would each invent keys; "
              "distribute keys with a Secret or shared volume instead", file=sys.stderr)  # fmt: skip
        return 2
    if args.command == "serve":
        server.serve(
            Settings(
                keys_dir=args.keys_dir,
                host=args.host,
                port=args.port,
                uds=args.uds,
                workers=args.workers,
                exchange_threads=args.exchange_threads,
                prefix=args.prefix,
                auto_keygen=not args.fleet if args.auto_keygen is None else args.auto_keygen,
                recheck_seconds=args.recheck_seconds,
                health_path=args.health_path,
                ready_path=args.ready_path,
                metrics_path=args.metrics_path,
                status_path=args.status_path,
                metrics_dir=args.metrics_dir,
                max_target_bytes=args.max_target_bytes,
                max_body_bytes=args.max_body_bytes,
                drain_seconds=args.drain_seconds,
                request_timeout=args.request_timeout,
                max_header_bytes=args.max_header_bytes,
                keep_alive_seconds=args.keep_alive_seconds,
                max_connections=args.max_connections,
                max_queue_ms=args.max_queue_ms,
                log_level=args.log_level,
                access_log=args.access_log,
                access_log_format=args.access_log_format,
                trusted_proxies=tuple(args.trusted_proxy),
                allow_recovery=tuple(args.allow_recovery),
                allow_advertisement=tuple(args.allow_advertisement),
                state_dir=args.state_dir,
                ledger_clients=args.ledger_clients,
                ledger_retention_days=args.ledger_retention_days,
                usage_flush_seconds=args.usage_flush_seconds,
                handoff_socket="" if args.handoff_socket == "none" else args.handoff_socket,
            )
        )
    elif args.command == "keygen":
        try:
            written = keyfiles.generate_keys(args.directory)
        except keyfiles.RotationError as exc:
            print(f"tang-server keygen: {exc}", file=sys.stderr)
            return 1
        for path in written:
            print(path)
    elif args.command == "rotate":
        try:
            rotate(args)
        except keyfiles.RotationError as exc:
            print(f"tang-server rotate: {exc}", file=sys.stderr)
            return 1
    elif args.command == "delete-hidden":
        from .retirement import guard_deletion

        if not guard_deletion(args):
            return 1
        try:
            removed = keyfiles.delete_hidden(args.directory, None if args.all else args.kid)
        except keyfiles.RotationError as exc:
            print(f"tang-server delete-hidden: {exc}", file=sys.stderr)
            return 1
        for kid, name in removed:
            print(f"deleted {kid} ({name})")
        if not removed:
            print("no hidden keys to delete")
    elif args.command == "keys":
        from .retirement import usage_command

        return usage_command(args)
    elif args.command == "fleet":
        return fleet_command(args)
    elif args.command == "kubernetes":
        return kubernetes_command(args)
    elif args.command == "check":
        from .check import CheckFailed, check

        try:
            result = check(args.url, rounds=args.rounds, timeout=args.timeout)
        except CheckFailed as exc:
            print(f"FAILED: {exc}", file=sys.stderr)
            return 1
        print(f"ok: advertisement signed by {' '.join(result.signing_kids)}; "
              f"{result.checked} recoveries through /rec/{result.exchange_kid} gave the bound key")  # fmt: skip
    elif args.command == "show-keys":
        from .check import CheckFailed, verified_keys

        try:
            # Verified first: a thumbprint printed here is one to pin, and clevis refuses a badly signed advertisement.
            document = client.fetch_advertisement(args.url)
            verified_keys(document)
            for thumbprint in client.verify_key_thumbprints(document):
                print(thumbprint)
        except (OSError, ValueError, KeyError, CheckFailed) as exc:
            print(f"tang-server show-keys: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
