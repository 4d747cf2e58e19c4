"""Every row of the protocol document's route and response rules, against a live server on a real socket."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .support import (
    Server,
    client_key,
    load_keys,
    our_server,
    parse_response,
    raw_request,
    request,
    thumbprint,
)


def load_keys_visible(directory: Path) -> tuple[dict[str, object], dict[str, object]]:
    keys = [json.loads(p.read_text()) for p in directory.glob("[!.]*.jwk")]
    signing = next(k for k in keys if "sign" in k["key_ops"])
    exchange = next(k for k in keys if "deriveKey" in k["key_ops"])
    return signing, exchange


@pytest.fixture(scope="module")
def kids(shared_server: Server) -> dict[str, str]:
    directory = Path(shared_server.log).parent / "keys"
    signing, exchange = load_keys_visible(directory)
    return {"sig": thumbprint(signing), "exc": thumbprint(exchange)}


@pytest.mark.parametrize("target", ["/adv", "/adv/", "//adv//", "///adv", "/adv///"])
def test_default_advertisement_with_elastic_slashes(shared_server: Server, target: str) -> None:
    response = request(shared_server.port, "GET", target)
    assert response.status == 200
    assert response.headers["content-type"] == "application/jose+json"
    assert int(response.headers["content-length"]) == len(response.body) > 0
    assert "location" not in response.headers


@pytest.mark.parametrize(
    "target",
    [
        "/",
        "/adv?x=1",
        "/adv?",
        "/ADV",
        "/rec",
        "/rec/",
        "/adv/a/b",
        "/adv/a%2Fb",
        "/adv/x!",
        "/advx",
        "/xadv",
    ],
)
def test_anything_else_is_404_with_empty_body(shared_server: Server, target: str) -> None:
    for method in ("GET", "POST"):
        response = request(shared_server.port, method, target, b"{}" if method == "POST" else None)
        assert (response.status, response.body) == (404, b""), (method, target)
        assert response.headers["content-length"] == "0"


def test_absolute_form_target_is_404(shared_server: Server) -> None:
    data = b"GET http://127.0.0.1/adv HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    assert parse_response(raw_request(shared_server.port, data)).status == 404


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("POST", "/adv"),
        ("HEAD", "/adv"),
        ("PUT", "/adv/"),
        ("DELETE", "/adv/abc"),
        ("GET", "/rec/abc"),
        ("HEAD", "/rec/abc"),
        ("PUT", "//rec//abc"),
    ],
)
def test_matching_route_with_wrong_method_is_405(shared_server: Server, method: str, target: str) -> None:
    response = request(shared_server.port, method, target, b"{}" if method in ("POST", "PUT") else None)
    assert response.status == 405
    assert response.headers["content-length"] == "0"


def test_advertisement_by_thumbprint_of_signing_key(shared_server: Server, kids: dict[str, str]) -> None:
    assert request(shared_server.port, "GET", f"/adv/{kids['sig']}").status == 200
    assert request(shared_server.port, "GET", f"//adv//{kids['sig']}").status == 200


@pytest.mark.parametrize("kid", ["exc", "unknown"])
def test_advertisement_by_thumbprint_of_exchange_or_unknown_key_is_404(
    shared_server: Server, kids: dict[str, str], kid: str
) -> None:
    target = f"/adv/{kids.get(kid, 'AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA')}"
    assert request(shared_server.port, "GET", target).status == 404


def test_recovery_success_headers(shared_server: Server, kids: dict[str, str]) -> None:
    body = json.dumps(client_key()).encode()
    response = request(shared_server.port, "POST", f"/rec/{kids['exc']}", body)
    assert response.status == 200
    assert response.headers["content-type"] == "application/jwk+json"
    assert int(response.headers["content-length"]) == len(response.body) == 253


def test_target_of_4096_bytes_is_414_and_4095_is_not(shared_server: Server) -> None:
    long_target = "/adv/" + "A" * (4096 - 5)
    assert len(long_target) == 4096
    assert request(shared_server.port, "GET", long_target).status == 414
    assert request(shared_server.port, "GET", long_target[:-1]).status == 404


def test_body_of_65536_bytes_is_413_and_65535_is_not(shared_server: Server, kids: dict[str, str]) -> None:
    target = f"/rec/{kids['exc']}"
    for _ in range(20):  # the answer must arrive every time, not be lost to a reset on close
        assert request(shared_server.port, "POST", target, b" " * 65536).status == 413
        assert request(shared_server.port, "POST", "/nope", b" " * 200_000).status == 413
    assert request(shared_server.port, "POST", target, b" " * 65535).status == 400


def test_chunked_body_over_the_limit_is_413(shared_server: Server, kids: dict[str, str]) -> None:
    chunk = b"%x\r\n%s\r\n" % (40000, b" " * 40000)
    data = (
        (
            f"POST /rec/{kids['exc']} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        ).encode()
        + chunk * 2
        + b"0\r\n\r\n"
    )
    assert parse_response(raw_request(shared_server.port, data)).status == 413


def test_chunked_body_and_http_1_0_are_accepted(shared_server: Server, kids: dict[str, str]) -> None:
    body = json.dumps(client_key()).encode()
    data = (
        f"POST /rec/{kids['exc']} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ).encode() + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    assert parse_response(raw_request(shared_server.port, data)).status == 200
    response = parse_response(raw_request(shared_server.port, b"GET /adv HTTP/1.0\r\n\r\n"))
    assert response.status == 200
    assert int(response.headers["content-length"]) == len(response.body)


def test_any_content_type_or_none(shared_server: Server, kids: dict[str, str]) -> None:
    body = json.dumps(client_key()).encode()
    for content_type in (
        "",
        "Content-Type: text/plain\r\n",
        "Content-Type: application/x-www-form-urlencoded\r\n",
    ):
        data = (
            f"POST /rec/{kids['exc']} HTTP/1.1\r\nHost: x\r\n{content_type}Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode() + body
        assert parse_response(raw_request(shared_server.port, data)).status == 200


def test_path_prefix_moves_every_route(keys: Path, tmp_path: Path) -> None:
    signing, exchange = load_keys(keys)
    with our_server(keys, tmp_path / "log", "--prefix", "tang") as server:
        assert request(server.port, "GET", "/tang/adv").status == 200
        assert request(server.port, "GET", "//tang//adv/").status == 200
        assert request(server.port, "GET", f"/tang/adv/{thumbprint(signing)}").status == 200
        body = json.dumps(client_key()).encode()
        assert request(server.port, "POST", f"/tang/rec/{thumbprint(exchange)}", body).status == 200
        assert request(server.port, "GET", "/adv").status == 404
        assert request(server.port, "POST", f"/rec/{thumbprint(exchange)}", body).status == 404
        assert request(server.port, "GET", "/other/adv").status == 404


def test_exchange_threads_give_the_same_answers(keys: Path, tmp_path: Path) -> None:
    _, exchange = load_keys(keys)
    bodies = [json.dumps(client_key()).encode() for _ in range(5)]
    answers = {}
    for threads in ("0", "2"):
        with our_server(keys, tmp_path / f"log{threads}", "--exchange-threads", threads) as server:
            answers[threads] = [
                request(server.port, "POST", f"/rec/{thumbprint(exchange)}", body).body for body in bodies
            ]
            assert request(server.port, "POST", f"/rec/{thumbprint(exchange)}", b"[]").status == 400
    assert answers["0"] == answers["2"]
    assert all(len(answer) == 253 for answer in answers["0"])
