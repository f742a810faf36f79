"""Who the client is: the direct peer, or what a trusted proxy in front of us says it is.

aiohttp-remotes was considered: its XForwardedFiltered takes X-Forwarded-For from any peer,
trusted or not (spoofable), XForwardedStrict refuses requests whose whole chain is not
trusted, neither knows CF-Connecting-IP or unix-socket peers, and their trusted list is
fixed at start-up, where ours reloads with the policy.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import secrets
from collections.abc import Iterable

from aiohttp import web

from qp.storage.database import Database

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


class TrustedProxies:
    """The trusted proxies of one policy, answering for address strings from a cache: a
    request costs a dictionary lookup, not address parsing.

    A client is known by its address, or for IPv6 by its network of `ipv6_prefix` bits:
    every address of one /64 (a home, a phone) is one client, or rotating through them would
    dodge every limit.
    """

    MAX_REMEMBERED = 10_000

    def __init__(self, networks: tuple[IPNetwork, ...], ipv6_prefix: int = 128):
        self._networks = networks
        self._ipv6_prefix = ipv6_prefix
        # address text -> (the client it names, or None if not an address; trusted)
        self._seen: dict[str, tuple[str | None, bool]] = {}

    def classify(self, text: str) -> tuple[str | None, bool]:
        known = self._seen.get(text)
        if known is None:
            if len(self._seen) >= self.MAX_REMEMBERED:
                self._seen.clear()
            address = _ip(text)
            trusted = address is not None and any(address in n for n in self._networks)
            known = self._seen[text] = (self._client(address), trusted)
        return known

    def _client(self, address: IPAddress | None) -> str | None:
        if address is None:
            return None
        if isinstance(address, ipaddress.IPv6Address) and self._ipv6_prefix < 128:
            return str(ipaddress.IPv6Network((address, self._ipv6_prefix), strict=False))
        return str(address)


def _ip(text: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        # An IPv4 peer on a dual-stack socket shows as ::ffff:a.b.c.d.
        if address.ipv4_mapped:
            return address.ipv4_mapped
        # fe80::1%eth0 and fe80::1%2 are one address: the scope (zone) is not the client's.
        if address.scope_id is not None:
            return ipaddress.IPv6Address(int(address))
    return address


def client_address(request: web.BaseRequest, trusted: TrustedProxies) -> str:
    """The client's address as the contract means it.

    Headers count only when the direct peer is a trusted proxy (or the unix socket): then
    the right-most X-Forwarded-For entry that is not itself a trusted proxy; failing that,
    CF-Connecting-IP; failing that, the left-most X-Forwarded-For entry.
    """
    peer, peer_trusted = trusted.classify(request.remote or "")
    if peer is not None and not peer_trusted:
        return peer
    # The peer is a trusted proxy, or a unix-socket peer (no address): believe its headers.
    forwarded = [
        (address, is_trusted)
        for header in request.headers.getall("X-Forwarded-For", [])
        for part in header.split(",")
        for address, is_trusted in (trusted.classify(part),)
        if address is not None
    ]
    for address, is_trusted in reversed(forwarded):
        if not is_trusted:
            return address
    cloudflare, _ = trusted.classify(request.headers.get("CF-Connecting-IP", ""))
    if cloudflare is not None:
        return cloudflare
    if forwarded:
        return forwarded[0][0]
    return peer if peer is not None else "unix"


def peer_address(request: web.BaseRequest, trusted: TrustedProxies) -> str:
    """The direct peer, for a request whose headers could not be read (a proxy's own)."""
    peer, _ = trusted.classify(request.remote or "")
    return peer if peer is not None else "unix"


@functools.lru_cache(maxsize=65536)
def hash_client(address: str, salt: str) -> str:
    """Addresses are kept only as salted SHA-256 hashes."""
    return hashlib.sha256(f"{salt}\x00{address}".encode()).hexdigest()


SALT = "SELECT value FROM settings WHERE name = 'ip_salt'"
KEEP_SALT = """
    INSERT INTO settings (name, value) VALUES ('ip_salt', ?)
    ON CONFLICT (name) DO UPDATE SET value = excluded.value
"""
MAKE_SALT = """
    INSERT INTO settings (name, value) VALUES ('ip_salt', ?) ON CONFLICT (name) DO NOTHING
"""


async def installation_salt(db: Database) -> str:
    """The random salt for client-address hashes, made on first use and kept. Read before
    it is written: a restart on a full disk needs no room."""
    row = await db.fetchone(SALT)
    if row is None:
        await db.execute_write(MAKE_SALT, (secrets.token_hex(32),))
        row = await db.fetchone(SALT)
    assert row is not None
    return str(row[0])


async def stored_salt(db: Database) -> str | None:
    """The installation's salt, if it has made one."""
    row = await db.fetchone(SALT)
    return str(row[0]) if row else None


async def keep_salt(db: Database, salt: str) -> None:
    """Make `salt` the installation's (copying a database: its blocks' hashes still match)."""
    await db.execute_write(KEEP_SALT, (salt,))


IP_SALT = web.AppKey("ip_salt", str)
