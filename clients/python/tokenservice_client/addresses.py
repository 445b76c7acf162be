"""Client addresses as gRPC reports them: one reading for tokenservice and the interceptors."""

from __future__ import annotations

import ipaddress
from urllib.parse import unquote


def ip_address(text: str) -> str | None:
    """`text` as one canonical spelling of an IP address, or None if it is none.

    IPv6 is compressed and lower-case, and an IPv4-mapped IPv6 address
    (`::ffff:192.0.2.7`, what a dual-stack socket reports for an IPv4 client) is
    the IPv4 address: one client, one spelling, one throttle bucket.
    """
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def peer_address(peer: str) -> str | None:
    """The IP address of a gRPC peer string, or None (a Unix socket, say).

    grpcio reports `ipv4:192.0.2.7:5000` and, for IPv6, `ipv6:[2001:db8::1]:5000`
    with the brackets (and a zone's `%`) percent-encoded in current releases:
    `ipv6:%5B::1%5D:5000`.
    """
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host, _, port = unquote(rest).rpartition(":")
    if not port.isdigit():  # no port: the whole rest is the address
        host = unquote(rest)
    return ip_address(host)
