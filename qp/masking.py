"""Secrets masked out of URLs and of the errors that echo them, for logs and messages."""

from __future__ import annotations

import re
from urllib.parse import unquote

MASK = "********"
# Query parameters whose values are secrets, by a part of their name: libpq's password and
# sslpassword, and the usual names of tokens, keys and signatures (access_token, api_key,
# X-Amz-Signature, X-Amz-Credential, client_secret, auth, ...).
_SECRET_PARAMETER = re.compile(r"pass|pwd|token|secret|key|sig|auth|cred|session", re.IGNORECASE)


def mask_url(url: str) -> str:
    """The URL with every secret in it masked, for logs and messages: the password of its
    user info, and the value of every query (or fragment) parameter named like a secret."""
    return _masked(url)[0]


def redact(text: str, url: str | None) -> str:
    """`text` (an error from a driver or an SDK, which may echo its URL or a part of it)
    with every secret of `url` masked, as written or percent-decoded."""
    if url is None:
        return text
    text = text.replace(url, mask_url(url))
    secrets = {form for secret in _masked(url)[1] for form in (secret, unquote(secret))}
    # A driver may cut a badly written URL at these and echo a piece ("port: 'pa'").
    secrets |= {piece for secret in secrets for piece in re.split("[/?#@:]", secret) if piece}
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def _masked(url: str) -> tuple[str, list[str]]:
    """The URL masked, and the secrets masked in it."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url, []
    secrets: list[str] = []
    userinfo, at, rest = _user_info(rest)
    user, colon, password = userinfo.partition(":")
    if colon:
        secrets.append(password)
        userinfo = f"{user}:{MASK}"
    rest, hash_, fragment = rest.partition("#")
    path, question, query = rest.partition("?")
    query, fragment = _mask_parameters(query, secrets), _mask_parameters(fragment, secrets)
    return f"{scheme}{sep}{userinfo}{at}{path}{question}{query}{hash_}{fragment}", secrets


def _user_info(rest: str) -> tuple[str, str, str]:
    """(user info, "@", the rest) of what follows `scheme://`, or ("", "", rest). It ends at
    the last "@" before the path; a password written with a bare "/", "?" or "#" in it is
    still found, up to the first "=" of a query (a query's value may hold an "@")."""
    end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    at = rest.rfind("@", 0, end)
    if at < 0:
        question = rest.find("?")
        equals = rest.find("=", question) if question >= 0 else -1
        at = rest.rfind("@", 0, equals if equals >= 0 else len(rest))
    if at < 0:
        return "", "", rest
    return rest[:at], "@", rest[at + 1 :]


def _mask_parameters(query: str, secrets: list[str]) -> str:
    """`name=value&...` with the values of secret-named parameters masked (and noted)."""
    parts = []
    for part in query.split("&"):
        name, equals, value = part.partition("=")
        if equals and value and _SECRET_PARAMETER.search(unquote(name)):
            secrets.append(value)
            value = MASK
        parts.append(f"{name}{equals}{value}")
    return "&".join(parts)
