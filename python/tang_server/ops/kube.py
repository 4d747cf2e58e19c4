"""Keys in a Kubernetes Secret: a manifest from a key directory, and two-phase rotation through the API.

Every replica mounts the same Secret (no `subPath`), so the kubelet is what distributes keys; these functions only
change the Secret, in the same two phases as `rotate --stage` / `--promote` on a directory, and wait between the
phases until every pod behind the headless Service serves the new key set. Each change is a read-modify-replace
carrying the `resourceVersion` that was read: if anyone else changed the Secret meanwhile, the API answers 409 and
the change is recomputed from the new contents, never written over them.

The official client (`pip install tang-server[kubernetes]`) is imported only here.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tang_server.keys import keyfiles
from tang_server.keys.keyset import KEY_SUFFIX, build_keyset

Data = dict[str, bytes]

CONFLICT_RETRIES = 10


def secret_manifest(directory: Path, name: str, namespace: str | None = None) -> dict[str, Any]:
    """A Secret holding every key file of a directory (hidden ones included), for `kubectl apply -f -`."""
    data = {
        path.name: base64.b64encode(path.read_bytes()).decode()
        for path in sorted(directory.iterdir())
        if path.name.endswith(KEY_SUFFIX) and path.is_file()
    }
    metadata: dict[str, Any] = {"name": name, "labels": {"app.kubernetes.io/name": "tang-server"}}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": metadata, "data": data}


def digest_of(data: Mapping[str, bytes]) -> str:
    """The key-set digest replicas will report once they serve these contents."""
    files = [(name, json.loads(content)) for name, content in sorted(data.items()) if name.endswith(KEY_SUFFIX)]
    return build_keyset(files).digest


def stage(data: Data) -> Data:
    """Phase one: a new pair as hidden, staged keys."""
    if any(name.startswith(keyfiles.STAGED_PREFIX) for name in data):
        raise keyfiles.RotationError("a staged pair exists already: promote it first")
    new = dict(data)
    for key in keyfiles.generate_pair():
        new[keyfiles.STAGED_PREFIX + keyfiles.key_file_name(key)] = json.dumps(
            key, sort_keys=True, separators=(",", ":")
        ).encode()
    return new


def promote(data: Data) -> Data:
    """Phase two: the staged pair visible, every previously visible key hidden. All in one replace."""
    staged = [name for name in data if name.startswith(keyfiles.STAGED_PREFIX)]
    if not staged:
        raise keyfiles.RotationError("no staged pair to promote")
    new: Data = {}
    for name, content in data.items():
        if name in staged:
            new[name.removeprefix(keyfiles.STAGED_PREFIX)] = content
        elif name.endswith(KEY_SUFFIX) and not name.startswith("."):
            new[f".{name}"] = content
        else:
            new[name] = content
    return new


def update_secret(api: Any, name: str, namespace: str, change: Callable[[Data], Data]) -> Data:
    """Read, change, replace with the read resourceVersion; on 409 start again from the new contents."""
    from kubernetes.client.exceptions import ApiException

    for _ in range(CONFLICT_RETRIES):
        secret = api.read_namespaced_secret(name, namespace)
        current = {key: base64.b64decode(value) for key, value in (secret.data or {}).items()}
        changed = change(current)
        secret.data = {key: base64.b64encode(value).decode() for key, value in changed.items()}
        try:
            api.replace_namespaced_secret(name, namespace, secret)  # carries metadata.resourceVersion
        except ApiException as exc:
            if exc.status == 409:
                continue  # someone else changed it: recompute from what is there now
            raise
        return changed
    raise RuntimeError(f"secret {namespace}/{name} kept changing under us ({CONFLICT_RETRIES} conflicts)")


def rotate_secret(
    api: Any,
    name: str,
    namespace: str,
    wait: Callable[[str], bool],
    say: Callable[[str], None] = print,
) -> bool:
    """stage -> wait for every pod -> promote -> wait. Returns False if a wait timed out (nothing is undone)."""
    staged = update_secret(api, name, namespace, stage)
    say(f"1/4 staged {' '.join(n for n in staged if n.startswith(keyfiles.STAGED_PREFIX))} in {namespace}/{name}")
    digest = digest_of(staged)
    say(f"2/4 waiting for every pod to serve {digest[:16]}")
    if not wait(digest):
        say("stopped before promoting: the staged keys are hidden, nothing is advertised yet")
        return False
    promoted = update_secret(api, name, namespace, promote)
    say(f"3/4 promoted; hidden {' '.join(n for n in promoted if n.startswith('.'))}")
    digest = digest_of(promoted)
    say(f"4/4 waiting for every pod to serve {digest[:16]}")
    return wait(digest)


def core_api(host: str | None = None) -> Any:
    """The CoreV1 API: in-cluster service account credentials, or an explicit host (tests, kubectl proxy)."""
    from kubernetes import client, config

    if host is None:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
        return client.CoreV1Api()
    configuration = client.Configuration()
    configuration.host = host
    return client.CoreV1Api(client.ApiClient(configuration))
