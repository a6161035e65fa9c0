"""The job record: the body of ``job.completed``, ``job.pending`` and ``job.found`` replies."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from contracts.timestamps import Timestamp


class Status(StrEnum):
    """Status of an intent event; a job's status is that of its latest event."""

    #: No step has started yet.
    NA = "NA"
    #: A step is running.
    RUN = "RUN"
    #: A step failed transiently and will be retried.
    ERR = "ERR"
    #: A step handed its work to an outside service and will be polled again.
    QUEUED = "QUEUED"
    #: A step succeeded.
    OK = "OK"
    #: A step failed for good.
    KO = "KO"
    #: A step decided it had nothing to do.
    SKIP = "SKIP"
    #: A step ran past its timeout.
    TIMEOUT = "TIMEOUT"


#: Statuses that end an intent.
FINAL_STATUSES = frozenset({Status.OK, Status.KO, Status.SKIP, Status.TIMEOUT})


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=False)


class Event(_Record):
    """One status change inside an intent."""

    index: int = Field(ge=0)
    status: Status
    at: Timestamp
    code: str | None = None
    message: str | None = None
    meta: dict[str, str] = Field(default_factory=dict)


class Intent(_Record):
    """The record of one step's execution inside a job."""

    id: str
    step_id: str
    name: str | None = None
    action: str
    events: list[Event] = Field(default_factory=list)
    completed: bool = False
    created_at: Timestamp
    updated_at: Timestamp

    @property
    def status(self) -> Status:
        """Status of the latest event, ``NA`` when there is none."""
        return self.events[-1].status if self.events else Status.NA


class Fault(_Record):
    """An error recorded on the job; a job with faults has failed."""

    action: str | None = None
    code: str
    message: str
    paths: list[str] = Field(default_factory=list)


class Attachment(_Record):
    """A file produced for the job's silo entry, such as a rendered PDF."""

    id: str
    key: str
    name: str
    desc: str | None = None
    mime: str
    size: int = Field(ge=0)
    hash: str = Field(description="SHA-256 of the bytes, lowercase hex")
    category: str | None = None


class Job(_Record):
    """One run of a workflow over one document.

    A job is finished exactly when ``completed_at`` is set, and it failed when
    ``faults`` is not empty. ``envelope`` is the complete GOBL envelope once the job
    is finished.
    """

    id: str
    workspace_id: str
    workflow_id: str
    workflow_version: str
    silo_entry_id: str | None = None
    key: str | None = None
    meta: dict[str, str] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list)
    status: Status = Status.NA
    intents: list[Intent] = Field(default_factory=list)
    faults: list[Fault] = Field(default_factory=list)
    attachments: list[Attachment] = Field(default_factory=list)
    envelope: dict[str, Any] | None = None
    attempts: int = Field(
        default=0, ge=0, description="Scheduled retries so far of the step that is waiting"
    )
    next_attempt_at: Timestamp | None = Field(
        default=None, description="When a step waiting for a retry runs again"
    )
    created_at: Timestamp
    updated_at: Timestamp
    completed_at: Timestamp | None = None

    @property
    def finished(self) -> bool:
        """Whether the job has completed, successfully or not."""
        return self.completed_at is not None

    @property
    def failed(self) -> bool:
        """Whether the job recorded at least one fault."""
        return bool(self.faults)
