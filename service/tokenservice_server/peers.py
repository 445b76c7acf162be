"""Who is calling, by address: the gRPC peer, trusted proxies and x-forwarded-for."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from tokenservice_client import ip_address, peer_address


def parse_networks(
    entries: Iterable[str],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Addresses or CIDR ranges (`10.0.0.0/8`, `::1`); ValueError names a bad one."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip().strip("[]"), strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or CIDR range") from None
    return tuple(networks)


class TrustedProxies:
    """The peers allowed to name the real client in `x-forwarded-for`."""

    def __init__(self, entries: Iterable[str]) -> None:
        self._networks = parse_networks(entries)

    def __contains__(self, address: str | None) -> bool:
        if address is None:
            return False
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        return any(ip in network for network in self._networks)


def client_address(peer: str, forwarded: str | None, trusted: TrustedProxies) -> str:
    """The caller's address: the TCP peer, or, from a trusted proxy, the client it names.

    A trusted proxy's `x-forwarded-for` is read from the right: its last entry is
    the address the proxy itself saw (the REST shim sends only that one); what
    lies to the left came from the client and proves nothing.
    """
    address = peer_address(peer)
    # A Unix socket peer is the REST shim of `serve --workers N`'s supervisor on a
    # worker's private socket (server.py, local_socket): nobody else can reach it.
    if (address in trusted or peer.startswith("unix:")) and forwarded:
        named = ip_address(forwarded.rsplit(",", 1)[-1])
        if named is not None:
            return named
    return address if address is not None else peer
