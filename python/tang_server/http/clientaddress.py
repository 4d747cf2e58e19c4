"""The client's address for logs: the peer, or what trusted proxies say the client was.

`X-Forwarded-For` is believed only when the immediate peer is a configured trusted proxy, and then only as far as
the chain of trusted proxies goes: the address taken is the right-most one that is not itself a trusted proxy.
Anything a client writes into the header on its own is to the left of that and ignored.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(value, strict=False) for value in values)


def client_address(peer: str | None, forwarded_for: bytes | None, trusted: tuple[Network, ...]) -> str:
    if peer is None:
        return "-"
    if not trusted or forwarded_for is None or not _is_trusted(peer, trusted):
        return peer
    hops = [hop.strip() for hop in forwarded_for.decode("latin-1").split(",")]
    for hop in reversed(hops):
        if not hop:
            break
        if not _is_trusted(hop, trusted):
            return hop if _is_address(hop) else peer
    return peer


def allowed(address: str, networks: tuple[Network, ...]) -> bool:
    """Whether an address is in one of the networks (an empty policy allows everybody)."""
    return not networks or _is_trusted(address, networks)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_trusted(address: str, trusted: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)
