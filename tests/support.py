"""Helpers shared by the tests: starting real servers on real sockets, speaking raw HTTP, playing the client."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from tang_server.keys import b64, jwk

REFERENCE_TANGD = Path("/usr/libexec/tangd")
REFERENCE_KEYGEN = Path("/usr/libexec/tangd-keygen")
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A port nobody listens on now. It may be taken before it is used: servers are started with `running`,
    which retries on a collision and checks that the listener is the server's own."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes] | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port}")


def _tcp_sockets(port: int) -> Iterator[tuple[str, int, int]]:
    """(state, queued, inode) of every TCP socket whose local port is `port`, from the kernel's tables."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    yield fields[3], int(fields[4].split(":")[1], 16), int(fields[9])


_LISTEN, _ESTABLISHED = "0A", "01"


def _group_sockets(group: int) -> set[int]:
    """The inodes of every socket open in the processes of a process group."""
    inodes = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[2]) != group:
                continue
            for fd in os.listdir(f"/proc/{entry}/fd"):
                target = os.readlink(f"/proc/{entry}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def listens(process: subprocess.Popen[bytes], port: int) -> bool:
    """Whether `process` (or a process of its group) listens on `port`: the kernel's word, never a connection
    that another program's listener could have accepted."""
    listeners = {inode for state, _, inode in _tcp_sockets(port) if state == _LISTEN}
    return bool(listeners) and not listeners.isdisjoint(_group_sockets(process.pid))


def wait_accepted(port: int, connections: int, timeout: float = 30.0) -> None:
    """Until the server on `port` has accepted at least `connections` connections and has none left waiting in
    its listen queue (what a fixed sleep after connecting only hoped for)."""
    deadline = time.monotonic() + timeout
    while True:
        sockets = list(_tcp_sockets(port))
        waiting = sum(queued for state, queued, _ in sockets if state == _LISTEN)
        established = sum(1 for state, _, _ in sockets if state == _ESTABLISHED)
        if waiting == 0 and established >= connections:
            return
        assert time.monotonic() < deadline, f"{waiting} connections still waiting to be accepted on port {port}"
        time.sleep(0.01)


#: What servers say when another program took their port between our choice and their bind.
_COLLISION = "address already in use"


@dataclass
class Server:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _start(command: Sequence[str], port: int, log: Path, env: dict[str, str] | None, deadline: float) -> Server | None:
    """The server once it listens on `port`; None if it could not bind the port (a collision)."""
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    while not listens(process, port):
        if process.poll() is not None:
            text = log.read_text(errors="replace")
            if _COLLISION in text.lower():
                return None
            raise RuntimeError(f"server exited with {process.returncode}: {text[-3000:]}")
        if time.monotonic() > deadline:
            stop_process_group(process)
            raise TimeoutError(f"nothing listening on port {port}: {log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.02)
    wait_for_workers(command, process, log, deadline)
    return Server(f"http://127.0.0.1:{port}", port, process, log)


#: uvicorn's line once a worker process has built its application, which loads the key directory first.
_WORKER_STARTED = "Started server process ["


def wait_for_workers(command: Sequence[str], process: subprocess.Popen[bytes], log: Path, deadline: float) -> None:
    """For our `serve`: until every worker has loaded its keys. The listener takes connections before that (the
    supervisor binds it before starting workers), so a test that changes the key directory just after start would
    race a worker's first load. Returns early if the server exits; bounds a hang only."""
    if "serve" not in command or "--workers" not in command:
        return
    workers = int(command[list(command).index("--workers") + 1])
    while log.read_text(errors="replace").count(_WORKER_STARTED) < workers and process.poll() is None:
        if time.monotonic() > deadline:
            stop_process_group(process)
            raise TimeoutError(f"{workers} workers never all started: {log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.02)


def stop_process_group(process: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """SIGTERM to a server's process group; SIGKILL if it has not exited within `timeout` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def running(command: Sequence[str], port: int, log: Path, env: dict[str, str] | None = None) -> Iterator[Server]:
    """Run a server that listens on `port` (e.g. again after a restart); while another program holds the port
    (a client's ephemeral port, say), start it again until it binds."""
    deadline = time.monotonic() + 30
    while (server := _start(command, port, log, env, deadline)) is None:
        assert time.monotonic() < deadline, f"port {port} stayed taken by another program"
        time.sleep(0.1)
    try:
        yield server
    finally:
        stop_process_group(server.process)


@contextlib.contextmanager
def running_on_free_port(
    command: Callable[[int], Sequence[str]], log: Path, env: dict[str, str] | None = None
) -> Iterator[Server]:
    """Run `command(port)` on a free port; when another program took that port meanwhile, on another."""
    deadline = time.monotonic() + 30
    while (server := _start(command(port := free_port()), port, log, env, deadline)) is None:
        assert time.monotonic() < deadline, "every port tried was taken by another program"
    try:
        yield server
    finally:
        stop_process_group(server.process)


def serve_command(keys: Path, port: int, *extra: str, workers: int = 1) -> list[str]:
    """The command line of our server on a key directory and a port."""
    return [str(BIN / "tang-server"), "serve", "--keys-dir", str(keys), "--port", str(port),
            "--workers", str(workers), *extra]  # fmt: skip


@contextlib.contextmanager
def our_server(keys: Path, log: Path, *extra: str, workers: int = 1) -> Iterator[Server]:
    """Our server on a free port; when it stops, its whole log is checked for private key material."""
    secrets = private_members(keys)
    with running_on_free_port(lambda port: serve_command(keys, port, *extra, workers=workers), log) as server:
        yield server
    assert_no_secrets(log.read_text(errors="replace"), secrets | private_members(keys))


def private_members(directory: Path) -> set[str]:
    """The `d` of every key file in a directory (and in a Secret volume's data directory), if readable."""
    found = set()
    for path in directory.glob("**/*.jwk") if directory.is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            value = json.loads(path.read_text()).get("d")
            if isinstance(value, str):
                found.add(value)
    return found


def assert_no_secrets(text: str, secrets: set[str]) -> None:
    assert '"d"' not in text, "a JWK private member appears in the log"
    for secret in secrets:
        assert secret[:16] not in text, "private key material appears in the log"


def reference_server(keys: Path, log: Path) -> contextlib.AbstractContextManager[Server]:
    """The reference C server, one process per connection through socat, as Debian's socket activation does."""
    return running_on_free_port(
        lambda port: ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork", f"EXEC:{REFERENCE_TANGD} {keys}"],
        log,
    )


def raw_request(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send bytes on a fresh connection and return everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(data)
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def statuses(data: bytes) -> list[bytes]:
    """The status code of every HTTP/1.1 answer in `data`, in order."""
    return re.findall(rb"HTTP/1\.1 (\d{3}) ", data)


def parse_response(data: bytes) -> Response:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Response(status, headers, body)


def request(port: int, method: str, target: str, body: bytes | None = None) -> Response:
    """One HTTP/1.1 request with `Connection: close`, exactly as given (no normalisation of the target)."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")
    return parse_response(raw_request(port, data))


def load_keys(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (signing, exchange) key of a directory with exactly one of each (hidden or not)."""
    keys = [json.loads(path.read_text()) for path in directory.iterdir() if path.name.endswith(".jwk")]
    signing = [k for k in keys if "sign" in k.get("key_ops", [])]
    exchange = [k for k in keys if "deriveKey" in k.get("key_ops", [])]
    assert len(signing) == 1 and len(exchange) == 1, keys
    return signing[0], exchange[0]


def client_key(*, private: bool = False) -> dict[str, Any]:
    """A fresh client ECMR key (what clevis sends: public members only, unless `private`)."""
    numbers = ec.generate_private_key(ec.SECP521R1()).private_numbers()
    key = {
        "alg": "ECMR",
        "crv": "P-521",
        "kty": "EC",
        "x": b64.encode(numbers.public_numbers.x.to_bytes(66, "big")),
        "y": b64.encode(numbers.public_numbers.y.to_bytes(66, "big")),
    }
    if private:
        key["d"] = b64.encode(numbers.private_value.to_bytes(66, "big"))
    return key


def thumbprint(key: Mapping[str, Any], hash_name: str = "S256") -> str:
    return jwk.thumbprint(key, hash_name)


def reference_keygen(directory: Path) -> None:
    """Keys made by the reference's own tool (it warns when it cannot chown to _tang; that is fine)."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(REFERENCE_KEYGEN), str(directory)], check=True, capture_output=True)


def require_tools(*names: str) -> None:
    """Interop tools are installed by `make test`; their absence is a broken setup, never a skip."""
    missing = [name for name in names if shutil.which(name) is None and not Path(name).exists()]
    assert not missing, f"missing tools (make test installs them): {missing}"


class SecretVolume:
    """A directory updated exactly as the kubelet updates a Secret volume (AtomicWriter)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir()
        self.generation = 0

    def publish(self, files: dict[str, bytes]) -> None:
        self.generation += 1
        new = self.path / f"..2026_11_24_00_00_{self.generation:02d}.{os.getpid()}"
        new.mkdir()
        for name, content in files.items():
            (new / name).write_bytes(content)
        old = os.readlink(self.path / "..data") if (self.path / "..data").exists() else None
        os.symlink(new.name, self.path / "..data_tmp")
        os.rename(self.path / "..data_tmp", self.path / "..data")  # the atomic swap
        for name in files:  # visible names are symlinks through ..data
            if not (self.path / name).is_symlink():
                os.symlink(f"..data/{name}", self.path / name)
        for entry in self.path.iterdir():
            if not entry.name.startswith("..") and entry.name not in files:
                entry.unlink()
        if old is not None:
            shutil.rmtree(self.path / old)


def worker_rss(parent: int) -> dict[int, int]:
    """Resident memory (KiB) of each worker process of a server (multiprocessing's helper excluded)."""
    sizes = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
            command = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields["PPid"]) == parent and b"resource_tracker" not in command:
            sizes[int(entry)] = int(fields["VmRSS"].split()[0])
    return sizes
