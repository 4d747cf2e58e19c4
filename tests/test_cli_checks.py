"""The client-side commands: `show-keys` without a URL, `check` and `show-keys` refusing a badly signed
advertisement, and `kubernetes rotate` itself against the API server stand-in of test_kubernetes."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tang_server.keys import b64, keyfiles
from tang_server.keys.keyset import load_keyset

from .oracles import digest, jose_thumbprint
from .support import BIN, SecretVolume, load_keys, our_server, request, require_tools
from .test_kubernetes import SecretServer

TANG_SERVER = str(BIN / "tang-server")

#: Inside a private network namespace, the default port 7500 is ours alone.
_SHOW_KEYS_BY_DEFAULT = """
ip link set lo up
"$TANG_SERVER" serve --keys-dir "$KEYS" --no-auto-keygen --no-access-log 2>/dev/null & server=$!
for attempt in $(seq 300); do
    if ours=$("$TANG_SERVER" show-keys 2>/dev/null); then break; fi
    sleep 0.1
done
theirs=$(tang-show-keys 7500)
kill $server; wait $server
printf 'ours %s\\ntheirs %s\\n' "$ours" "$theirs"
"""


def test_show_keys_without_a_url_asks_the_local_server_on_7500(keys: Path) -> None:
    require_tools("unshare", "ip", "tang-show-keys", "jose")
    signing, _ = load_keys(keys)
    result = subprocess.run(["unshare", "--net", "sh", "-c", _SHOW_KEYS_BY_DEFAULT],
                            env={"PATH": f"{BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "TANG_SERVER": TANG_SERVER,
                                 "KEYS": str(keys)},
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == [f"ours {jose_thumbprint(signing)}", f"theirs {jose_thumbprint(signing)}"]


@contextmanager
def serving_document(document: bytes) -> Iterator[str]:
    """A stand-in Tang server whose `/adv` is the given bytes."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/adv" else 404)
            self.send_header("Content-Type", "application/jose+json")
            self.send_header("Content-Length", str(len(document)))
            self.end_headers()
            self.wfile.write(document)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _tampered(keys: Path) -> bytes:
    """The real advertisement with its exchange key swapped for an attacker's, the signature kept."""
    advertisement = load_keyset(keys).default_advertisement
    assert advertisement is not None
    document = json.loads(advertisement)
    payload = json.loads(b64.decode(document["payload"]))
    attacker = {k: v for k, v in keyfiles.generate_pair()[1].items() if k != "d"}
    payload["keys"] = [key for key in payload["keys"] if "deriveKey" not in key["key_ops"]] + [attacker]
    document["payload"] = b64.encode(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode())
    return json.dumps(document).encode()


def test_check_and_show_keys_refuse_a_badly_signed_advertisement(keys: Path, tmp_path: Path) -> None:
    require_tools("jose")
    tampered = _tampered(keys)
    # The oracle: jose itself refuses the signature with the advertised verify key.
    signing, _ = load_keys(keys)
    (tmp_path / "adv.jws").write_bytes(tampered)
    (tmp_path / "sig.jwk").write_text(json.dumps({k: v for k, v in signing.items() if k != "d"}))
    verify = subprocess.run(["jose", "jws", "ver", "-i", str(tmp_path / "adv.jws"), "-k", str(tmp_path / "sig.jwk")],
                            capture_output=True, timeout=30)  # fmt: skip
    assert verify.returncode != 0
    with serving_document(tampered) as url:
        check = subprocess.run([TANG_SERVER, "check", url], capture_output=True, text=True, timeout=60)
        show = subprocess.run([TANG_SERVER, "show-keys", url], capture_output=True, text=True, timeout=60)
    assert check.returncode == 1
    assert "not signed by advertised key" in check.stderr
    assert show.returncode == 1 and show.stdout == ""
    assert "not signed" in show.stderr
    # The same commands accept the untampered advertisement (the stand-in is not what they refuse).
    genuine = load_keyset(keys).default_advertisement
    assert genuine is not None
    with serving_document(genuine) as url:
        show = subprocess.run([TANG_SERVER, "show-keys", url], capture_output=True, text=True, timeout=60)
    assert show.returncode == 0 and show.stdout.split() == [jose_thumbprint(signing)]


def test_kubernetes_rotate_command_runs_both_phases(keys: Path, tmp_path: Path) -> None:
    api_server = SecretServer({path.name: path.read_bytes() for path in keys.iterdir()})
    threading.Thread(target=api_server.serve_forever, daemon=True).start()
    volume = SecretVolume(tmp_path / "volume")
    volume.publish(api_server.contents())
    stop = threading.Event()

    def kubelet() -> None:
        """Brings every new version of the Secret to the pod's volume, as the kubelet does."""
        seen = api_server.version
        while not stop.wait(0.2):
            with api_server.lock:
                version, contents = api_server.version, api_server.contents()
            if version != seen:
                volume.publish(contents)
                seen = version

    updater = threading.Thread(target=kubelet, daemon=True)
    updater.start()
    try:
        with our_server(volume.path, tmp_path / "log", "--fleet", workers=2) as server:
            api = f"http://127.0.0.1:{api_server.server_address[1]}"
            result = subprocess.run([TANG_SERVER, "kubernetes", "rotate", "--secret", "tang-keys", "--namespace",
                                     "tang", "--service", server.url, "--api-host", api, "--timeout", "60"],
                                    capture_output=True, text=True, timeout=180)  # fmt: skip
            assert result.returncode == 0, result.stdout + result.stderr
            assert [line[:3] for line in result.stdout.splitlines() if line[:2] in ("1/", "2/", "3/", "4/")] == [
                "1/4",
                "2/4",
                "3/4",
                "4/4",
            ]
            status = json.loads(request(server.port, "GET", "/status").body)
    finally:
        stop.set()
        updater.join()
        api_server.shutdown()
        api_server.server_close()
    final = api_server.contents()
    names = [name for name in final if name.endswith(".jwk")]
    assert len(names) == 4
    assert {name[1:] for name in names if name.startswith(".")} == {path.name for path in keys.glob("*.jwk")}
    assert not [name for name in names if name.startswith(keyfiles.STAGED_PREFIX)]
    assert status["digest"] == digest(volume.path)


def test_kubernetes_rotate_stops_before_promoting_when_pods_never_follow(keys: Path, tmp_path: Path) -> None:
    """No kubelet: the pods never serve the staged keys, so the command fails and nothing is advertised."""
    api_server = SecretServer({path.name: path.read_bytes() for path in keys.iterdir()})
    threading.Thread(target=api_server.serve_forever, daemon=True).start()
    try:
        with our_server(keys, tmp_path / "log", "--fleet") as server:
            api = f"http://127.0.0.1:{api_server.server_address[1]}"
            result = subprocess.run([TANG_SERVER, "kubernetes", "rotate", "--secret", "tang-keys", "--namespace",
                                     "tang", "--service", server.url, "--api-host", api, "--timeout", "2"],
                                    capture_output=True, text=True, timeout=120)  # fmt: skip
    finally:
        api_server.shutdown()
        api_server.server_close()
    assert result.returncode == 1
    assert "stopped before promoting" in result.stdout
    staged = [name for name in api_server.contents() if name.startswith(keyfiles.STAGED_PREFIX)]
    assert len(staged) == 2
    visible = {name for name in api_server.contents() if not name.startswith(".")}
    assert visible == {path.name for path in keys.glob("*.jwk")}
