"""Policy: what operators change (origins, limits, ...), with the contract's defaults as data."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from qp.cors import OriginMatcher

DEFAULT_ALLOWED_ORIGINS = (
    "http://localhost:5173",
    "http://*.localhost:5173",
    "https://**.neurosift.app",
    "https://magland.github.io",
    "https://dandi.github.io",
    "https://medit.dandiarchive.org",
    "https://dandiset-metadata-assistant.surge.sh",
    "https://airesearchcoach.org",
)

DEFAULT_MAX_CHATS_PER_APP = 1000


@dataclass(frozen=True)
class Policy:
    """The rules requests are checked against; replaced whole, never edited in place."""

    allowed_origins: tuple[str, ...] = DEFAULT_ALLOWED_ORIGINS
    max_chats_per_app: int = DEFAULT_MAX_CHATS_PER_APP

    @cached_property
    def origin_matcher(self) -> OriginMatcher:
        return OriginMatcher(self.allowed_origins)


class PolicyHolder:
    """The policy in force. Requests read `current` once; a reload swaps it for new requests."""

    def __init__(self, policy: Policy):
        self.current = policy
