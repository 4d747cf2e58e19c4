"""`tang-server`: serve, and manage a key directory."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from tang_server import __version__
from tang_server.keys import keyfiles
from tang_server.keys.keyset import load_keyset
from tang_server.ops import client
from tang_server.serving import server
from tang_server.settings import DEFAULT_MIN_IDLE_DAYS, DEFAULT_PORT, Settings, non_negative, positive


def add_setting_options(serve: argparse.ArgumentParser) -> None:
    """One option per `Settings` field: the field's default, help and parsing (settings.py is their one source)."""
    for setting in dataclasses.fields(Settings):
        metadata = setting.metadata
        options = dict(metadata["argparse"])
        flag = options.pop("flag", "--" + setting.name.replace("_", "-"))
        factory = setting.default_factory  # workers: computed from this machine
        computed = callable(factory)
        default = options.pop("cli_default", factory() if callable(factory) else setting.default)
        help_text = metadata["help"]
        if options.pop("switch", False):
            options["action"] = argparse.BooleanOptionalAction
            if default is not None:
                help_text += f" (default: {'on' if default else 'off'})"
        if default is dataclasses.MISSING:
            options["required"] = True
        elif isinstance(default, tuple):  # repeatable
            options.update(action="append", default=list(default))
        else:
            options["default"] = default
            if default not in (None, "") and "action" not in options:  # flags say their default themselves
                help_text += " (here: %(default)s)" if computed else " (default: %(default)s)"
        if metadata["parse"] is not None:
            options["type"] = metadata["parse"]
        serve.add_argument(flag, dest=setting.name, help=help_text, **options)


def settings_from(args: argparse.Namespace) -> Settings:
    values = {setting.name: getattr(args, setting.name) for setting in dataclasses.fields(Settings)}
    values.update({name: tuple(value) for name, value in values.items() if isinstance(value, list)})
    if values["auto_keygen"] is None:
        values["auto_keygen"] = not args.fleet
    return Settings(**values)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="tang-server", description=__doc__)
    top.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = top.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the Tang protocol")
    add_setting_options(serve)
    serve.add_argument(
        "--fleet",
        action="store_true",
        help="one of several replicas sharing keys: never generate keys (each replica would invent its own)",
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
    from tang_server.ops import fleet  # imports prometheus-client, which the serve path must import later

    if args.fleet_command == "status":
        replicas = fleet.survey(args.targets)
        print(fleet.report(replicas))
        return 0 if fleet.agreed_digest(replicas) else 1
    if args.fleet_command == "wait":
        return 0 if fleet.wait(args.targets, args.digest, args.timeout) else 1
    return two_phase_rotation(args, fleet.wait)


def kubernetes_command(args: argparse.Namespace) -> int:
    from tang_server.ops import fleet, kube

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
        server.serve(settings_from(args))
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
        from tang_server.ops.retirement import guard_deletion

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
        from tang_server.ops.retirement import usage_command

        return usage_command(args)
    elif args.command == "fleet":
        return fleet_command(args)
    elif args.command == "kubernetes":
        return kubernetes_command(args)
    elif args.command == "check":
        from tang_server.ops.check import CheckFailed, check

        try:
            result = check(args.url, rounds=args.rounds, timeout=args.timeout)
        except CheckFailed as exc:
            print(f"FAILED: {exc}", file=sys.stderr)
            return 1
        print(f"ok: advertisement signed by {' '.join(result.signing_kids)}; "
              f"{result.checked} recoveries through /rec/{result.exchange_kid} gave the bound key")  # fmt: skip
    elif args.command == "show-keys":
        from tang_server.ops.check import CheckFailed, verified_keys

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
