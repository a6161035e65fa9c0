"""UTC timestamps rendered as RFC 3339 with milliseconds and a ``Z`` suffix."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, PlainSerializer


def as_utc(value: datetime) -> datetime:
    """Return ``value`` as an aware UTC datetime; naive values are taken to be UTC."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def format_timestamp(value: datetime) -> str:
    """Render ``value`` as ``2026-01-31T12:00:00.123Z``."""
    utc = value if value.tzinfo is UTC else as_utc(value)
    # isoformat is several times faster than strftime; the offset it adds is +00:00.
    return utc.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def utc_now() -> datetime:
    """Return the current time in UTC, truncated to the millisecond that is stored."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


Timestamp = Annotated[
    datetime,
    AfterValidator(as_utc),
    PlainSerializer(format_timestamp, return_type=str, when_used="json"),
]
"""A datetime field that is always aware UTC and serialises to RFC 3339 with ``Z``."""
