"""Who the client is: the direct peer, or what a trusted proxy in front of us says it is.

aiohttp-remotes was considered: its XForwardedFiltered takes X-Forwarded-For from any peer,
trusted or not (spoofable), XForwardedStrict refuses requests whose whole chain is not
trusted, neither knows CF-Connecting-IP or unix-socket peers, and their trusted list is
fixed at start-up, where ours reloads with the policy.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable

from aiohttp import web

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(entries: Iterable[str]) -> tuple[IPNetwork, ...]:
    """Addresses and CIDR ranges; ValueError names the first bad one."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or CIDR range") from None
    return tuple(networks)


def _ip(text: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    # An IPv4 peer on a dual-stack socket shows as ::ffff:a.b.c.d.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _trusted(address: IPAddress, networks: tuple[IPNetwork, ...]) -> bool:
    return any(address in network for network in networks)


def client_address(request: web.BaseRequest, trusted: tuple[IPNetwork, ...]) -> str:
    """The client's address as the contract means it.

    Headers count only when the direct peer is a trusted proxy (or the unix socket): then
    the right-most X-Forwarded-For entry that is not itself a trusted proxy; failing that,
    CF-Connecting-IP; failing that, the left-most X-Forwarded-For entry.
    """
    peer = request.remote or ""
    peer_ip = _ip(peer)
    if peer_ip is not None and not _trusted(peer_ip, trusted):
        return str(peer_ip)
    # The peer is a trusted proxy, or a unix-socket peer (no address): believe its headers.
    forwarded = [
        address
        for header in request.headers.getall("X-Forwarded-For", [])
        for part in header.split(",")
        if (address := _ip(part)) is not None
    ]
    for address in reversed(forwarded):
        if not _trusted(address, trusted):
            return str(address)
    cloudflare = _ip(request.headers.get("CF-Connecting-IP", ""))
    if cloudflare is not None:
        return str(cloudflare)
    if forwarded:
        return str(forwarded[0])
    return str(peer_ip) if peer_ip is not None else "unix"


def hash_client(address: str, salt: str) -> str:
    """Addresses are kept only as salted SHA-256 hashes."""
    return hashlib.sha256(f"{salt}\x00{address}".encode()).hexdigest()
