"""What text the server stores or sends on: the one check every client string that reaches
a column passes at the door, the same on SQLite and PostgreSQL."""

from __future__ import annotations


def is_storable_text(text: str) -> bool:
    """True for text both databases hold as given: no NUL (PostgreSQL's text cannot hold
    one) and valid UTF-8 (no lone surrogate, which a query string or header may carry)."""
    if text.isascii():
        return "\x00" not in text
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
