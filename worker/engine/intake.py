"""Decoding commands and deciding whether a create-job command makes a new job.

The rules: a job id seen before with the same request fingerprint is a duplicate
delivery, and the caller gets the existing job. With another fingerprint, or from
another workspace, the same id is a conflict. A key held by another job of the workspace for less
than ``key_ttl_days`` is a conflict naming that job. ``silo_entry_id`` must exist;
``data`` becomes a new silo entry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pydantic_core
import structlog
import uuid6
from pydantic import BaseModel, ValidationError

from contracts import CreateJob, GetJob, Job
from contracts.commands import quote, time_based_uuid
from contracts.timestamps import utc_now
from worker.engine.handle import JobHandle
from worker.engine.messages import JOB_ACCEPTED, Delivery
from worker.engine.outbox import new_event, new_reply
from worker.errors import (
    Conflict,
    FaultDetail,
    InvalidCommand,
    InvalidJson,
    NotFound,
    RejectedError,
    TooLarge,
    Unprocessable,
    UnsupportedMedia,
)
from worker.gobl.c14n import digest
from worker.gobl.envelope import normalise_envelope
from worker.models import EntryRecord, JobRecord, WorkflowRecord
from worker.settings import Settings
from worker.store.base import InsertStatus, Store

log = structlog.get_logger("worker.intake")

ACCEPTED_CONTENT_TYPE = "application/json"


@dataclass(frozen=True)
class Accepted:
    """A new job, stored and owned by this worker, ready to run."""

    handle: JobHandle
    workflow: WorkflowRecord
    #: The job's silo entry as stored, so that the runner need not read it again.
    entry: EntryRecord | None


@dataclass(frozen=True)
class Duplicate:
    """A command for a job that exists already."""

    job: JobRecord


def decode(delivery: Delivery, model: type[BaseModel], max_bytes: int) -> Any:
    """Check the envelope of a delivery and validate its body against ``model``."""
    if len(delivery.body) > max_bytes:
        raise TooLarge(
            f"the body is {len(delivery.body)} bytes; commands may be at most {max_bytes} bytes"
        )
    media = (delivery.content_type or "").split(";")[0].strip().lower()
    if media != ACCEPTED_CONTENT_TYPE:
        got = quote(delivery.content_type) if delivery.content_type else "none"
        raise UnsupportedMedia(
            f"content_type must be {ACCEPTED_CONTENT_TYPE}; got {got}",
            faults=[FaultDetail("unsupported-content-type", f"got {got}", ("content_type",))],
        )
    if delivery.content_encoding not in (None, "", "identity", "utf-8"):
        raise UnsupportedMedia(
            f"content_encoding {quote(delivery.content_encoding)} is not supported; "
            "send uncompressed UTF-8 JSON"
        )
    try:
        body = pydantic_core.from_json(delivery.body, allow_inf_nan=False)
    except ValueError as exc:
        raise InvalidJson(
            f"the body is not valid UTF-8 JSON: {exc}; send one JSON object",
            faults=[FaultDetail("invalid-json", str(exc))],
        ) from None
    if not isinstance(body, dict):
        raise InvalidCommand(
            f"the body is a JSON {_json_type(body)}; a command is one JSON object",
            faults=[FaultDetail("not-an-object", "expected a JSON object", ("",))],
        )
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc, model, delivery.routing_key) from None


def validation_error(exc: ValidationError, model: type[BaseModel], name: str) -> InvalidCommand:
    """Turn pydantic's errors into one rejection that names each field and the fix."""
    accepted = ", ".join(
        field.alias or field_name for field_name, field in model.model_fields.items()
    )
    faults = []
    for error in exc.errors(include_url=False):
        path = ".".join(str(part) for part in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = f"unknown field; accepted fields are {accepted}"
        faults.append(FaultDetail(str(error["type"]), message, (path,) if path else ()))
    summary = "; ".join(f"{f.paths[0]}: {f.message}" if f.paths else f.message for f in faults)
    return InvalidCommand(
        f"invalid {name} command: {summary} (schema: contracts/schemas/{name}.json)",
        faults=faults,
    )


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


def fingerprint(command: CreateJob) -> str:
    """Return the hash that separates a duplicate delivery from a different request.

    It covers the normalised body without ``wait`` (how long the caller waits does
    not change the job) and without ``id`` (compared on its own). ``data`` is hashed
    as it was parsed rather than through a copy, because it is the largest part.
    """
    fields = command.model_dump(mode="json", exclude={"wait", "id", "data"})
    try:
        fields["data"] = None if command.data is None else digest(command.data)
    except ValueError as exc:
        raise Unprocessable(
            f"data has no canonical JSON form: {exc}. Numbers must be finite, and integers "
            "beyond 64 bits must fit in a double; GOBL writes amounts as strings",
            faults=[FaultDetail("invalid-number", str(exc), ("data",))],
        ) from exc
    return digest(fields)


class Intake:
    """Turns valid create-job commands into stored jobs."""

    def __init__(self, store: Store, settings: Settings, *, owner: str) -> None:
        self.store = store
        self.settings = settings
        self.owner = owner
        self._workflows: dict[tuple[str, str], tuple[WorkflowRecord, float]] = {}

    async def create(self, command: CreateJob, delivery: Delivery) -> Accepted | Duplicate:
        """Store a new job or recognise a duplicate; raise RejectedError otherwise.

        A job id is not looked up first: the insert finds out whether it is taken.
        """
        request_hash = fingerprint(command)
        job_id = command.id or _id_from_message(delivery.message_id)
        try:
            workflow = await self._published_workflow(command)
        except RejectedError:
            # The workflow may have changed since the job was accepted; a duplicate
            # still gets its job rather than a rejection.
            existing = await self.store.get_job(job_id) if job_id else None
            if existing is None:
                raise
            return self._duplicate(existing, command, request_hash, delivery)

        if job_id is None and command.key is not None:
            holder = await self.store.get_job_by_key(command.workspace_id, command.key)
            if holder is not None and holder.fingerprint == request_hash and self._key_live(holder):
                return self._duplicate(holder, command, request_hash, delivery)

        entry, new_entry = await self._input(command)
        for _ in range(2):
            entry_id = entry.id if entry is not None else None
            record = self._record(command, job_id, workflow, entry_id, request_hash, delivery)
            result = await self.store.insert_job(
                record,
                key_taken_since=utc_now() - timedelta(days=self.settings.key_ttl_days),
                entry=entry if new_entry else None,
            )
            if result.status is InsertStatus.CREATED:
                log.info(
                    "job.accepted",
                    job_id=record.id,
                    workspace_id=record.workspace_id,
                    workflow_id=record.workflow_id,
                    workflow_version=record.workflow_version,
                    silo_entry_id=record.silo_entry_id,
                )
                handle = JobHandle(self.store, record, fence=record.fence)
                return Accepted(handle, workflow, entry)
            if result.status is InsertStatus.ID_TAKEN:
                assert result.existing is not None
                return self._duplicate(result.existing, command, request_hash, delivery)
            if result.status is InsertStatus.KEY_TAKEN:
                assert result.existing is not None
                return self._key_taken(result.existing, command, request_hash, delivery)
            # ENTRY_TAKEN: a fresh v7 id collided, which only a broken clock makes likely.
            entry, new_entry = await self._input(command)
        raise Conflict(f"could not store a new silo entry for job {job_id}; send the command again")

    async def get(self, query: GetJob) -> Job:
        """Return the job a ``job.get`` command names; raise NotFound otherwise."""
        if query.id is not None:
            job = await self.store.get_job(query.id)
            if job is None or job.workspace_id != query.workspace_id:
                raise NotFound(f"no job {query.id} in workspace {query.workspace_id}")
        else:
            assert query.key is not None
            job = await self.store.get_job_by_key(query.workspace_id, query.key)
            if job is None:
                raise NotFound(f"no job with key {query.key!r} in workspace {query.workspace_id}")
        return job.public()

    # Rules

    async def _published_workflow(self, command: CreateJob) -> WorkflowRecord:
        record = await self._current_workflow(command.workspace_id, command.workflow_id)
        if record is None:
            raise NotFound(
                f"workflow {command.workflow_id} not found in workspace {command.workspace_id}; "
                "load it with `transform-worker workflows put FILE`",
                faults=[FaultDetail("workflow-not-found", "unknown workflow", ("workflow_id",))],
            )
        if record.workflow.draft:
            raise Unprocessable(
                f"workflow {command.workflow_id} is a draft; publish it (draft: false) first",
                faults=[FaultDetail("workflow-draft", "draft workflow", ("workflow_id",))],
            )
        return record

    async def _current_workflow(self, workspace_id: str, workflow_id: str) -> WorkflowRecord | None:
        """Return the current version, cached for ``workflow_cache_s``."""
        key = (workspace_id, workflow_id)
        now = time.monotonic()
        cached = self._workflows.get(key)
        if cached is not None and now - cached[1] < self.settings.workflow_cache_s:
            return cached[0]
        record = await self.store.get_workflow(workspace_id, workflow_id)
        if record is not None:
            self._workflows[key] = (record, now)
        return record

    def _duplicate(
        self, existing: JobRecord, command: CreateJob, request_hash: str, delivery: Delivery
    ) -> Duplicate:
        if existing.workspace_id != command.workspace_id:
            # Say nothing about the other workspace, not even that it exists.
            raise Conflict(
                f"job id {existing.id} is already taken; use another id",
                faults=[FaultDetail("id-taken", "id taken", ("id",))],
            )
        if existing.fingerprint != request_hash:
            raise Conflict(
                f"job {existing.id} exists with a different request; a repeated id must "
                "carry the same command (only wait may differ)",
                faults=[FaultDetail("id-reused", "different request for this id", ("id",))],
                job_id=existing.id,
            )
        log.info(
            "command.duplicate",
            job_id=existing.id,
            workspace_id=existing.workspace_id,
            completed=existing.completed_at is not None,
        )
        return Duplicate(existing)

    def _key_taken(
        self, holder: JobRecord, command: CreateJob, request_hash: str, delivery: Delivery
    ) -> Duplicate:
        if command.id is None and holder.fingerprint == request_hash:
            return self._duplicate(holder, command, request_hash, delivery)
        raise Conflict(
            f"key {command.key!r} is already used by job {holder.id} in workspace "
            f"{holder.workspace_id}; keys stay taken for {self.settings.key_ttl_days} days",
            faults=[FaultDetail("key-taken", "key already used", ("key",))],
            job_id=holder.id,
        )

    def _key_live(self, holder: JobRecord) -> bool:
        return holder.created_at >= utc_now() - timedelta(days=self.settings.key_ttl_days)

    async def _input(self, command: CreateJob) -> tuple[EntryRecord | None, bool]:
        """Return the job's entry (None for meta alone) and whether it is new."""
        if command.silo_entry_id is not None:
            existing = await self.store.get_entry(command.workspace_id, command.silo_entry_id)
            if existing is None:
                raise NotFound(
                    f"silo entry {command.silo_entry_id} not found in workspace "
                    f"{command.workspace_id}",
                    faults=[FaultDetail("entry-not-found", "unknown entry", ("silo_entry_id",))],
                )
            return existing, False
        if command.data is None:
            return None, False
        # Every job with data gets a new entry of its own: envelopes in the wild share
        # head.uuid values (copied examples, resubmissions), so it cannot be the key.
        envelope = normalise_envelope(command.data)
        entry_id = str(uuid6.uuid7())
        now = utc_now()
        entry = EntryRecord(
            id=entry_id,
            workspace_id=command.workspace_id,
            envelope=envelope,
            created_at=now,
            updated_at=now,
        )
        return entry, True

    def _record(
        self,
        command: CreateJob,
        job_id: str | None,
        workflow: WorkflowRecord,
        entry_id: str | None,
        request_hash: str,
        delivery: Delivery,
    ) -> JobRecord:
        now = utc_now()
        record = JobRecord(
            id=job_id or str(uuid6.uuid7()),
            workspace_id=command.workspace_id,
            workflow_id=command.workflow_id,
            workflow_version=workflow.version,
            silo_entry_id=entry_id,
            key=command.key,
            meta=dict(command.meta or {}),
            tags=list(command.tags),
            fingerprint=request_hash,
            fence=1,
            owner=self.owner,
            due_at=now + timedelta(seconds=self.settings.lease_s),
            created_at=now,
            updated_at=now,
            outbox=[new_event(JOB_ACCEPTED, now)],
        )
        if delivery.reply_to:
            record.outbox.append(
                new_reply(delivery.reply_to, delivery.correlation_id, command.wait, now)
            )
        record.refresh_outbox_due(self.settings.outbox_retry_s)
        return record


def _id_from_message(message_id: str | None) -> str | None:
    """Use the AMQP message_id as the job id when it is a time-based UUID.

    Publishers that set it get exactly one job per command even when the worker
    dies between storing the job and acknowledging the command.
    """
    if not message_id:
        return None
    try:
        return time_based_uuid(message_id)
    except ValueError:
        return None


def error_body(exc: Any) -> bytes:
    """Serialise a RejectedError as a ``contracts.Error`` body."""
    from contracts import Error, ErrorFault

    error = Error(
        key=exc.key,
        message=exc.message,
        faults=[
            ErrorFault(code=f.code, paths=list(f.paths), message=f.message) for f in exc.faults
        ],
        job_id=exc.job_id,
    )
    return error.model_dump_json().encode()
