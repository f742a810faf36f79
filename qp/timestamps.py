"""Timestamps as the worker wrote them: ISO 8601 UTC, three fractional digits and a `Z`.

Stored as text in that one format, so ordering by text is ordering by time.
"""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now_iso() -> str:
    return format_iso(datetime.now(UTC))


def format_iso(moment: datetime) -> str:
    # isoformat is C code; strftime was a measurable part of a request.
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def format_epoch(seconds: float) -> str:
    """Epoch seconds in the stored format."""
    return format_iso(datetime.fromtimestamp(seconds, UTC))


def parse_iso(text: str) -> str | None:
    """A date (`2026-11-01`) or date-time (with `Z` or an offset; none means UTC) in the
    stored format, or None when it is neither."""
    try:
        moment = datetime.fromisoformat(text.strip())
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return format_iso(moment)
    except (ValueError, OverflowError):  # not a date, or one UTC cannot show (year 0)
        return None


def epoch_seconds(iso: str) -> float:
    """A stored timestamp as epoch seconds (0 for one that is not ISO 8601)."""
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return 0.0


def later_than(now: str, previous: str) -> str:
    """`now`, or a millisecond after `previous` when `now` is not later (a chat's versions
    then each have an `updated_at` of their own, even written within one millisecond)."""
    earliest = epoch_seconds(previous) + 0.001
    return now if epoch_seconds(now) >= earliest else format_epoch(earliest)
