"""Messages between the engine and the broker, with no broker types in them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

JOB_ACCEPTED = "job.accepted"
JOB_COMPLETED = "job.completed"
JOB_FAILED = "job.failed"
JOB_PENDING = "job.pending"
JOB_REJECTED = "job.rejected"
JOB_FOUND = "job.found"

#: The ``x-status`` header of each successful reply type, mirroring HTTP.
REPLY_STATUS = {JOB_COMPLETED: 200, JOB_FOUND: 200, JOB_PENDING: 202}


@dataclass(frozen=True)
class Delivery:
    """A command as it came off the queue."""

    routing_key: str
    body: bytes
    content_type: str | None = None
    content_encoding: str | None = None
    reply_to: str | None = None
    correlation_id: str | None = None
    message_id: str | None = None
    #: How many times the broker delivered this message before (``x-delivery-count``).
    delivery_count: int = 0
    #: The publisher's broker user, checked by RabbitMQ when the publisher sets it.
    user_id: str | None = None


@dataclass(frozen=True)
class Outgoing:
    """A message to publish: a reply (to a queue) or an event (to the events exchange)."""

    routing_key: str
    type: str
    body: bytes
    message_id: str
    correlation_id: str | None = None
    headers: Mapping[str, str | int] = field(default_factory=dict)


class Publisher(Protocol):
    """The broker, as the engine uses it.

    Every method waits for the broker's confirm and raises
    ``worker.errors.TransientError`` when none comes within the publish timeout.
    """

    async def publish_reply(self, message: Outgoing) -> bool:
        """Publish to a caller's queue; return False when the broker returned it unroutable."""
        ...

    async def publish_event(self, message: Outgoing) -> None:
        """Publish to the events exchange."""
        ...

    async def publish_dead_letter(self, delivery: Delivery, *, reason: str, status: int) -> None:
        """Publish a copy of a rejected command to the dead-letter exchange."""
        ...
