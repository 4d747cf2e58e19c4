"""Property-based differential test of /rec: for generated bodies and key ids, our status, and on success our exact
answer, equal the reference server's on the same keys. The reference is the oracle for the check order."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tang_server import keyfiles

from .support import (
    Server,
    client_key,
    load_keys,
    our_server,
    reference_server,
    request,
    require_tools,
    thumbprint,
)

CLIENT = client_key(private=True)
OTHER = client_key()

names = st.sampled_from(["kty", "alg", "key_ops", "use", "crv", "x", "y", "d", "extra"])
values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-5, max_value=5),
    st.sampled_from(["EC", "RSA", "oct", "ECMR", "ES512", "P-521", "P-384", "enc", "sig", "", "deriveKey"]),
    st.sampled_from([CLIENT["x"], CLIENT["y"], CLIENT["d"], OTHER["x"], OTHER["y"], "AAAA", "A=", "+/"]),
    st.lists(st.sampled_from(["deriveKey", "sign", "verify", "encrypt", 5]), max_size=3),
)
objects = st.dictionaries(names, values, max_size=8)
# Mostly near-valid clevis bodies with some members changed, plus arbitrary objects, arrays and bytes.
near_valid = st.builds(
    lambda changes, drops: {
        **{k: v for k, v in CLIENT.items() if k != "d" and k not in drops},
        **changes,
    },
    st.dictionaries(names, values, max_size=2),
    st.sets(st.sampled_from(["alg", "crv", "kty", "x", "y"]), max_size=2),
)
bodies = st.one_of(
    near_valid.map(lambda o: json.dumps(o).encode()),
    objects.map(lambda o: json.dumps(o).encode()),
    st.lists(values, max_size=3).map(lambda a: json.dumps(a).encode()),
    st.binary(max_size=40),
)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server, dict[str, str]]]:
    require_tools("socat", "/usr/libexec/tangd")
    base = tmp_path_factory.mktemp("properties")
    keyfiles.generate_keys(base / "keys")
    signing, exchange = load_keys(base / "keys")
    kids = {
        "exchange": thumbprint(exchange),
        "exchange-s1": thumbprint(exchange, "S1"),
        "signing": thumbprint(signing),
        "unknown": thumbprint(OTHER),
    }
    with (
        our_server(base / "keys", base / "ours.log", "--no-auto-keygen") as ours,
        reference_server(base / "keys", base / "reference.log") as reference,
    ):
        yield ours, reference, kids


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, which=st.sampled_from(["exchange", "exchange", "exchange-s1", "signing", "unknown"]))
def test_rec_matches_the_reference(servers: tuple[Server, Server, dict[str, str]], body: bytes, which: str) -> None:
    ours, reference, kids = servers
    target = f"/rec/{kids[which]}"
    mine, theirs = request(ours.port, "POST", target, body), request(reference.port, "POST", target, body)
    assert mine.status == theirs.status, body
    if mine.status == 200:
        assert mine.body == theirs.body


def test_generated_bodies_reach_every_outcome(servers: tuple[Server, Server, dict[str, str]]) -> None:
    """The strategies are not all rejected at the first check: they produce each status of the table."""
    ours, _, kids = servers
    seen: set[int] = set()

    @settings(max_examples=300, deadline=None, database=None)
    @given(body=bodies, which=st.sampled_from(list(kids)))
    def collect(body: bytes, which: str) -> None:
        seen.add(request(ours.port, "POST", f"/rec/{kids[which]}", body).status)

    collect()
    assert {200, 400, 403, 404} <= seen
