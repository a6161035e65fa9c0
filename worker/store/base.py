"""The ``Store`` protocol that every database backend implements.

Backends are the only modules that talk to a database. Each method that decides a
uniqueness question (job id, job key, entry id, entry key, sequence number) does so
with one atomic database operation, relying on a unique index; none reads first and
writes after. Every other job or entry write is a compare-and-set on ``rev``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol

from worker.models import EntryRecord, JobRecord, WorkflowRecord


class InsertStatus(StrEnum):
    """Result of inserting a job."""

    CREATED = "created"
    #: A job with this id exists; ``existing`` is that job (in any workspace).
    ID_TAKEN = "id_taken"
    #: Another job of the workspace has the key; ``existing`` is that job.
    KEY_TAKEN = "key_taken"
    #: The entry to insert with the job exists already; ``entry`` is the stored one.
    ENTRY_TAKEN = "entry_taken"


@dataclass(frozen=True)
class InsertResult:
    status: InsertStatus
    existing: JobRecord | None = None
    entry: EntryRecord | None = None


@dataclass(frozen=True)
class StoredFile:
    """Bytes of an attachment with what is known about them."""

    workspace_id: str
    id: str
    name: str
    mime: str
    data: bytes


class Store(Protocol):
    """Persistence for jobs, silo entries, workflows, attachment files and sequences.

    Every method raises ``worker.errors.StoreUnavailable`` when the database cannot be
    reached or refuses the operation for a reason that may pass.
    """

    async def open(self) -> None:
        """Connect and create the tables or indexes that are missing."""

    async def close(self) -> None:
        """Release the connection; safe to call twice."""

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the database responds."""

    # Jobs

    async def insert_job(
        self, job: JobRecord, *, key_taken_since: datetime, entry: EntryRecord | None = None
    ) -> InsertResult:
        """Insert a new job, and ``entry`` with it when given.

        The job's key (if any) is taken unless another job of the workspace has it
        and was created at or after ``key_taken_since``; an older holder loses it.
        An entry id (or entry key) that exists already returns ENTRY_TAKEN and no job
        is written. On SQLite the entry and the job are written in one transaction;
        elsewhere the entry is written first, so a failed job insert can leave it.
        """

    async def get_job(self, job_id: str) -> JobRecord | None:
        """Return the job with this id in any workspace, or None."""

    async def get_job_by_key(self, workspace_id: str, key: str) -> JobRecord | None:
        """Return the job that has ``key`` in the workspace, or None."""

    async def replace_job(
        self,
        job: JobRecord,
        *,
        expected_rev: int,
        entry: EntryRecord | None = None,
        expected_entry_rev: int | None = None,
    ) -> bool:
        """Store ``job`` if the stored one still has ``expected_rev``; return whether it did.

        ``job.rev`` must already be the new revision. With ``entry``, the entry is
        replaced too under the same rule, and False means neither was written. SQLite
        writes both in one transaction; MongoDB writes the entry first and puts its
        previous version back when the job's compare-and-set misses.
        """

    async def due_jobs(self, now: datetime, limit: int) -> list[JobRecord]:
        """Return unfinished jobs whose ``due_at`` has passed, oldest first."""

    async def due_outboxes(self, now: datetime, limit: int) -> list[JobRecord]:
        """Return jobs whose ``outbox_due_at`` has passed, oldest first."""

    # Silo entries

    async def insert_entry(self, entry: EntryRecord) -> EntryRecord | None:
        """Insert an entry; return None on success or the entry that already exists."""

    async def get_entry(self, workspace_id: str, entry_id: str) -> EntryRecord | None:
        """Return the entry of the workspace with this id, or None."""

    async def replace_entry(self, entry: EntryRecord, *, expected_rev: int) -> bool:
        """Store ``entry`` if the stored one still has ``expected_rev``."""

    # Workflows

    async def put_workflow(self, record: WorkflowRecord) -> None:
        """Store a workflow version and make it the current one of its id.

        Putting a version that exists already only makes it current again.
        """

    async def get_workflow(
        self, workspace_id: str, workflow_id: str, version: str | None = None
    ) -> WorkflowRecord | None:
        """Return the given version, or the current one when ``version`` is None."""

    async def list_workflows(self, workspace_id: str) -> list[WorkflowRecord]:
        """Return the current version of every workflow of the workspace, by id."""

    # Sequences

    async def assign_number(
        self, workspace_id: str, series: str, entry_id: str, *, start: int
    ) -> int:
        """Return the number of ``series`` given to ``entry_id``, assigning the next one.

        Numbers start at ``start`` and never repeat or skip, whatever the concurrency.
        Asking again for the same entry returns the same number, so a step that runs
        twice after a crash does not use up a second number.
        """

    # Files

    async def put_file(self, file: StoredFile) -> None:
        """Store attachment bytes under ``(workspace_id, id)``; an existing id is kept."""

    async def get_file(self, workspace_id: str, file_id: str) -> StoredFile | None:
        """Return the stored bytes, or None."""
