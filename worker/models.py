"""Stored records: the public job plus what the worker needs to own, resume and answer it."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from contracts import Attachment, Job, Workflow
from contracts.timestamps import Timestamp

OutboxState = Literal["pending", "sending", "sent", "undeliverable"]


class OutboxItem(BaseModel):
    """A reply or event the job still owes, or has delivered.

    Items move ``pending`` → ``sending`` → ``sent`` (or ``undeliverable`` when the
    broker returned a reply because its queue is gone). ``sending`` is written before
    publishing, so an item left in that state by a crashed worker is published again,
    with the same ``id`` as its AMQP ``message_id`` so that listeners can drop the copy.
    """

    model_config = ConfigDict(extra="ignore")

    id: str
    kind: Literal["reply", "event"]
    state: OutboxState = "pending"
    created_at: Timestamp
    claimed_at: Timestamp | None = None
    sent_at: Timestamp | None = None
    #: Reply: the caller's queue and correlation id, and the ``wait`` deadline if any.
    reply_to: str | None = None
    correlation_id: str | None = None
    deadline: Timestamp | None = None
    #: What was (or is being) sent: ``job.completed``, ``job.pending``, ``job.accepted``, …
    message_type: str | None = None
    error: str | None = None


#: The fields of a stored job that callers see.
PUBLIC_FIELDS: set[str] = set(Job.model_fields)


class JobRecord(Job):
    """A job as stored: the public fields plus ownership, fingerprint and outbox."""

    fingerprint: str
    #: Bumped by every write; writes are compare-and-set on it.
    rev: int = 0
    #: Bumped by every claim; a runner whose fence is stale must stop writing.
    fence: int = 0
    owner: str | None = None
    #: When the job may next be claimed: lease end while running, next attempt while
    #: waiting for a retry, None once completed.
    due_at: Timestamp | None = None
    outbox: list[OutboxItem] = Field(default_factory=list)
    #: Earliest time an outbox item needs attention, None when nothing is owed.
    outbox_due_at: Timestamp | None = None

    def public(self) -> Job:
        """Return the job as callers see it."""
        return Job.model_validate(self.model_dump(include=PUBLIC_FIELDS))

    def public_json(self) -> bytes:
        """Serialise the job as callers see it, without building a ``Job`` first."""
        return self.model_dump_json(include=PUBLIC_FIELDS).encode()

    def refresh_outbox_due(self, retry_after_s: float) -> None:
        """Recompute ``outbox_due_at``: when the sweeper must look at this job's outbox.

        A reply with a deadline is due at the deadline. Events and claimed items are
        published by the worker that wrote them, so they are only due for the sweeper
        once ``retry_after_s`` has passed without them being marked sent.
        """
        retry_after = timedelta(seconds=retry_after_s)
        times: list[datetime] = []
        for item in self.outbox:
            if item.state == "sending" and item.claimed_at is not None:
                times.append(item.claimed_at + retry_after)
            elif item.state == "pending" and item.kind == "event":
                times.append(item.created_at + retry_after)
            elif item.state == "pending" and item.deadline is not None:
                times.append(item.deadline)
        self.outbox_due_at = min(times) if times else None


class EntryRecord(BaseModel):
    """A stored GOBL envelope with its state, folder and attachments."""

    model_config = ConfigDict(extra="ignore")

    id: str
    workspace_id: str
    key: str | None = None
    state: str | None = None
    folder: str | None = None
    envelope: dict[str, Any]
    attachments: list[Attachment] = Field(default_factory=list)
    rev: int = 0
    created_at: Timestamp
    updated_at: Timestamp


class WorkflowRecord(BaseModel):
    """One immutable version of a workflow."""

    workflow: Workflow
    version: str
    created_at: Timestamp

    @property
    def workspace_id(self) -> str:
        return self.workflow.workspace_id

    @property
    def id(self) -> str:
        return self.workflow.id
