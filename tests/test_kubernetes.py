"""Keys in a Kubernetes Secret: the manifest, and in-cluster rotation against an API server stand-in.

No cluster can run here. The stand-in implements the real API semantics for one Secret: GET, and PUT that must
carry the current `metadata.resourceVersion` (409 Conflict otherwise, as the API server answers). The official
client library talks to it over HTTP exactly as it would to a cluster.
"""

from __future__ import annotations

import base64
import json
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tang_server.keys import keyfiles
from tang_server.keys.keyset import load_keyset
from tang_server.ops import fleet, kube

from .support import BIN, SecretVolume, our_server, request

PATH = "/api/v1/namespaces/tang/secrets/tang-keys"


class SecretServer(ThreadingHTTPServer):
    def __init__(self, data: dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), SecretHandler)
        self.lock = threading.Lock()
        self.version = 1
        self.data = {k: base64.b64encode(v).decode() for k, v in data.items()}
        self.puts = 0
        self.conflicts = 0
        #: Runs before a PUT is judged: a test's concurrent edit.
        self.before_put: Callable[[SecretServer], None] = lambda server: None

    def document(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {"name": "tang-keys", "namespace": "tang", "resourceVersion": str(self.version)},
            "data": dict(self.data),
        }

    def contents(self) -> dict[str, bytes]:
        return {k: base64.b64decode(v) for k, v in self.data.items()}


class SecretHandler(BaseHTTPRequestHandler):
    server: SecretServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def answer(self, status: int, document: dict[str, Any]) -> None:
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.split("?")[0] != PATH:
            self.answer(404, {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404})
            return
        with self.server.lock:
            self.answer(200, self.server.document())

    def do_PUT(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.puts += 1
            self.server.before_put(self.server)
            if body["metadata"].get("resourceVersion") != str(self.server.version):
                self.server.conflicts += 1
                self.answer(409, {"kind": "Status", "status": "Failure", "reason": "Conflict", "code": 409,
                                  "message": "the object has been modified"})  # fmt: skip
                return
            self.server.version += 1
            self.server.data = dict(body.get("data") or {})
            self.answer(200, self.server.document())


@pytest.fixture
def api_server(keys: Path) -> Iterator[SecretServer]:
    data = {path.name: path.read_bytes() for path in keys.iterdir()}
    server = SecretServer(data)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_manifest_holds_every_key_file(keys: Path) -> None:
    keyfiles.rotate(keys)  # hidden keys too
    result = subprocess.run([str(BIN / "tang-server"), "kubernetes", "secret", str(keys), "--name", "tang-keys",
                             "--namespace", "tang"], capture_output=True, text=True, check=True)  # fmt: skip
    manifest = json.loads(result.stdout)
    assert manifest["kind"] == "Secret" and manifest["metadata"]["namespace"] == "tang"
    assert {name: base64.b64decode(value) for name, value in manifest["data"].items()} == {
        path.name: path.read_bytes() for path in keys.iterdir()
    }
    assert len([name for name in manifest["data"] if name.startswith(".")]) == 2


def test_in_cluster_rotation_with_a_concurrent_edit(api_server: SecretServer, tmp_path: Path) -> None:
    """Both phases go through; a concurrent edit (409) is retried on the new contents, never overwritten."""
    volume = SecretVolume(tmp_path / "volume")
    volume.publish(api_server.contents())
    api = kube.core_api(f"http://127.0.0.1:{api_server.server_address[1]}")

    def someone_else_edits(server: SecretServer) -> None:
        if server.puts == 1:  # between our read and our write
            server.data["unrelated.txt"] = base64.b64encode(b"someone else's change").decode()
            server.version += 1

    api_server.before_put = someone_else_edits
    with our_server(volume.path, tmp_path / "log", "--fleet", workers=2) as server:

        def kubelet_then_wait(digest: str) -> bool:
            volume.publish(api_server.contents())  # the kubelet brings the Secret to the pod
            return fleet.wait([server.url], digest, timeout=20, say=lambda line: None)

        said: list[str] = []
        assert kube.rotate_secret(api, "tang-keys", "tang", kubelet_then_wait, say=said.append)
        assert request(server.port, "GET", "/readyz").status == 200
    assert api_server.conflicts == 1
    final = api_server.contents()
    assert final["unrelated.txt"] == b"someone else's change"  # the concurrent edit survived
    names = [name for name in final if name.endswith(".jwk")]
    assert len(names) == 4
    assert len([name for name in names if name.startswith(".")]) == 2
    assert not [name for name in names if name.startswith(keyfiles.STAGED_PREFIX)]
    assert [line[:3] for line in said] == ["1/4", "2/4", "3/4", "4/4"]
    assert load_keyset(volume.path).digest == kube.digest_of(final)


def test_promote_without_stage_is_refused(api_server: SecretServer) -> None:
    api = kube.core_api(f"http://127.0.0.1:{api_server.server_address[1]}")
    with pytest.raises(keyfiles.RotationError):
        kube.update_secret(api, "tang-keys", "tang", kube.promote)
    assert api_server.puts == 0
