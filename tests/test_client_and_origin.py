"""Who a request comes from (client-address parsing) and which origins CORS allows, on their
own; the same behaviour through the server is in test_rate_limits.py and test_cors.py."""

from __future__ import annotations

import re

import pytest
from aiohttp.test_utils import make_mocked_request

from qp.protection.client_address import (
    TrustedProxies,
    client_address,
    hash_client,
    parse_networks,
)
from qp.protection.cors import OriginMatcher

pytestmark = pytest.mark.on_both_databases

PROXIES = TrustedProxies(parse_networks(["10.0.0.0/8", "::1"]), ipv6_prefix=64)


class Transport:
    """What aiohttp asks for the peer's address."""

    def __init__(self, peer: tuple[str, int] | None):
        self.peer = peer

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.peer if name == "peername" else default


def address(peer: str | None, **headers: str) -> str:
    request = make_mocked_request(
        "GET",
        "/",
        headers={k.replace("_", "-"): v for k, v in headers.items()},
        transport=Transport((peer, 5000) if peer else None),
    )
    return client_address(request, PROXIES)


def test_an_untrusted_peer_is_the_client_whatever_its_headers_say():
    assert address("203.0.113.9", X_Forwarded_For="1.2.3.4", CF_Connecting_IP="5.6.7.8") == (
        "203.0.113.9"
    )


def test_behind_a_trusted_proxy_the_right_most_untrusted_forwarded_address_counts():
    forwarded = "198.51.100.1, 203.0.113.7, 10.1.1.1"
    assert address("10.0.0.2", X_Forwarded_For=forwarded) == "203.0.113.7"


def test_behind_a_trusted_proxy_cloudflares_header_comes_next():
    assert address("10.0.0.2", CF_Connecting_IP="203.0.113.8") == "203.0.113.8"
    assert address("10.0.0.2", X_Forwarded_For="10.1.1.1", CF_Connecting_IP="203.0.113.8") == (
        "203.0.113.8"
    )


def test_when_every_forwarded_address_is_a_proxy_the_left_most_counts():
    assert address("10.0.0.2", X_Forwarded_For="10.9.9.9, 10.1.1.1") == "10.9.9.9"


def test_garbage_in_forwarded_headers_is_skipped():
    assert address("10.0.0.2", X_Forwarded_For="not-an-ip, 203.0.113.5, ") == "203.0.113.5"
    assert address("10.0.0.2", X_Forwarded_For="junk", CF_Connecting_IP="also junk") == "10.0.0.2"


def test_a_unix_socket_peer_is_trusted_and_without_headers_is_unix():
    assert address(None, X_Forwarded_For="203.0.113.4") == "203.0.113.4"
    assert address(None) == "unix"


@pytest.mark.parametrize(
    ("peer", "client"),
    [
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("fe80::1%2", "fe80::/64"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("192.0.2.1", "192.0.2.1"),
    ],
)
def test_ipv6_clients_are_their_64_and_scope_ids_and_mapped_ipv4_are_unwrapped(peer, client):
    assert address(peer) == client


def test_addresses_are_kept_only_as_salted_hashes():
    assert hash_client("192.0.2.1", "salt") == hash_client("192.0.2.1", "salt")
    assert hash_client("192.0.2.1", "salt") != hash_client("192.0.2.1", "pepper")
    assert hash_client("192.0.2.1", "salt") != hash_client("192.0.2.2", "salt")
    assert len(hash_client("192.0.2.1", "")) == 64


def test_a_bad_trusted_proxy_entry_is_named():
    with pytest.raises(
        ValueError, match=re.escape("'10.0.0.300' is not an IP address or CIDR range")
    ):
        parse_networks(["10.0.0.0/8", "10.0.0.300"])


MATCHER = OriginMatcher(
    ("https://exact.example", "https://*.one-label.example", "https://**.any-depth.example")
)


@pytest.mark.parametrize(
    "origin",
    [
        "https://exact.example",
        "https://a.one-label.example",
        "https://a-b-9.one-label.example",
        "https://a.any-depth.example",
        "https://a.b.c.any-depth.example",
    ],
)
def test_exact_origins_and_patterns_allow(origin):
    assert MATCHER.allows(origin)


@pytest.mark.parametrize(
    "origin",
    [
        "http://exact.example",
        "https://exact.example:443",
        "https://exact.example.evil",
        "https://one-label.example",
        "https://a.b.one-label.example",
        "https://a.one-label.example.evil",
        "https://a_b.one-label.example",
        "https://any-depth.example",
        "https://evil.example/.any-depth.example",
        "https://a.any-depth.exampleXevil",
        "null",
        "",
    ],
)
def test_anything_else_is_refused(origin):
    assert not MATCHER.allows(origin)
