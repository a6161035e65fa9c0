"""Runs a claimed job's workflow, step by step, resuming where an earlier run stopped.

Resuming is replay: the flow is walked from the start, and a step with a completed
intent is not run again. Its recorded status and code steer the flow as they did the
first time, so the first step without a completed intent is the first to run.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

import httpx
import structlog
import uuid6
from pydantic import ValidationError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from contracts import FINAL_STATUSES, Attachment, Event, Fault, Intent, Next, Status, Step, Workflow
from contracts.timestamps import utc_now
from worker.actions.base import (
    RESULT_STATUSES,
    ActionResult,
    ActionSpec,
    Services,
    StepContext,
)
from worker.actions.registry import ActionRegistry
from worker.engine.handle import EntryChanged, JobHandle
from worker.engine.messages import JOB_COMPLETED, JOB_FAILED
from worker.engine.outbox import Outbox, claim_completion, new_event
from worker.engine.schedule import retry_delay_s
from worker.errors import StoreUnavailable, TransientError, Unprocessable
from worker.gobl.envelope import document_schema, normalise_envelope, replace_document
from worker.gobl.signing import SigningKey
from worker.models import EntryRecord, JobRecord
from worker.settings import Settings
from worker.store.base import Store, StoredFile

log = structlog.get_logger("worker.runner")

#: Times a step runs again because its silo entry changed under it, before it is
#: rescheduled like any transient failure.
MAX_ENTRY_CONFLICTS = 3


class Flow(Enum):
    """The way a list of steps ended."""

    CONTINUE = "continue"
    STOP = "stop"
    FAILED = "failed"
    WAITING = "waiting"


@dataclass(frozen=True)
class StepOutcome:
    status: Status
    code: str | None


class ServicesFactory:
    """Builds the ``Services`` an action gets for one job."""

    def __init__(
        self,
        store: Store,
        *,
        signing_key: Callable[[], Awaitable[SigningKey]],
        webhook_allow_hosts: frozenset[str] = frozenset(),
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.store = store
        self.signing_key = signing_key
        self.webhook_allow_hosts = webhook_allow_hosts
        self.http = http

    def for_entry(self, workspace_id: str, entry_id: str | None) -> Services:
        return Services(
            numbers=EntryNumbers(self.store, workspace_id, entry_id),
            signing_key=self.signing_key,
            webhook_allow_hosts=self.webhook_allow_hosts,
            http=self.http,
        )


class EntryNumbers:
    """Series numbers tied to one silo entry, so that asking twice gives one number."""

    def __init__(self, store: Store, workspace_id: str, entry_id: str | None) -> None:
        self.store = store
        self.workspace_id = workspace_id
        self.entry_id = entry_id

    async def assign(self, series: str, *, start: int) -> int:
        if self.entry_id is None:
            raise ValueError("a number needs a silo entry to belong to")
        return await self.store.assign_number(self.workspace_id, series, self.entry_id, start=start)


class RunState:
    """State of one run of a job: the workflow, the entry and the finished steps."""

    def __init__(self, handle: JobHandle, workflow: Workflow, entry: EntryRecord | None) -> None:
        self.handle = handle
        self.workflow = workflow
        self.entry = entry
        self.done = {i.step_id: i for i in handle.record.intents if i.completed}

    @property
    def job(self) -> JobRecord:
        return self.handle.record


class Runner:
    """Runs jobs; one instance serves every job of the worker."""

    def __init__(
        self,
        store: Store,
        registry: ActionRegistry,
        services: ServicesFactory,
        outbox: Outbox,
        settings: Settings,
    ) -> None:
        self.store = store
        self.registry = registry
        self.services = services
        self.outbox = outbox
        self.settings = settings

    async def run(
        self, handle: JobHandle, workflow: Workflow, *, entry: EntryRecord | None = None
    ) -> Flow:
        """Run or resume the job until it completes or waits for a retry.

        ``entry`` is the job's silo entry when the caller has it; otherwise it is read.
        """
        job = handle.record
        if entry is None and job.silo_entry_id is not None:
            entry = await self.store.get_entry(job.workspace_id, job.silo_entry_id)
        state = RunState(handle, workflow, entry)
        flow = await self._run_steps(workflow.steps, state, rescue=False)
        if flow is Flow.FAILED:
            flow = await self._run_steps(workflow.rescue, state, rescue=True)
        if flow is Flow.WAITING:
            return flow
        await self._complete(state)
        return flow

    # Flow

    async def _run_steps(self, steps: list[Step], state: RunState, *, rescue: bool) -> Flow:
        for step in steps:
            outcome = await self._run_step(step, state, rescue=rescue)
            if outcome is None:
                return Flow.WAITING
            block = None if _forced_fault(outcome) else _matching_block(step, outcome)
            if block is not None:
                flow = await self._run_steps(block.steps, state, rescue=rescue)
                if flow is not Flow.CONTINUE:
                    return flow
                if block.stop:
                    return Flow.STOP
                continue
            # Rescue steps all run, whatever an earlier one did: each is a separate
            # attempt to clean up or report, and its fault is recorded all the same.
            if outcome.status in (Status.KO, Status.TIMEOUT) and not rescue:
                return Flow.FAILED
        return Flow.CONTINUE

    async def _run_step(self, step: Step, state: RunState, *, rescue: bool) -> StepOutcome | None:
        """Run one step, or replay it if it completed before; None means it waits."""
        done = state.done.get(step.id or "")
        if done is not None:
            last = done.events[-1]
            return StepOutcome(last.status, last.code)

        started = time.monotonic()
        intent = _open_intent(state.job, step)
        result = await self._result(step, intent, state, rescue=rescue)
        if result is None:
            return None
        log.info(
            "step.finished",
            job_id=state.job.id,
            workspace_id=state.job.workspace_id,
            workflow_id=state.job.workflow_id,
            step_id=step.id,
            action=step.action,
            status=str(result.status),
            code=result.code,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )
        return StepOutcome(result.status, result.code)

    async def _result(
        self, step: Step, intent: Intent, state: RunState, *, rescue: bool
    ) -> ActionResult | None:
        """Produce and store the step's final result; None when it was rescheduled."""
        spec = self.registry.get(step.action)
        preset = None
        if spec is None:
            preset = ActionResult(
                Status.KO, "unknown-action", f"action {step.action!r} is not installed"
            )
        elif (mismatch := self._schema_mismatch(step, state)) is not None:
            preset = ActionResult(Status.KO, "schema-mismatch", mismatch)
        if preset is not None:
            _add_event(intent, Status.RUN)
            await self._finish_step(step, intent, preset, None, state, rescue=rescue)
            return preset

        assert spec is not None
        for _ in range(MAX_ENTRY_CONFLICTS):
            result = await self._execute(step, spec, intent, state)
            if result is None:
                return None
            attachments = await self._store_attachments(result, state)
            try:
                staged = self._staged_entry(result, state, attachments)
            except Unprocessable as exc:
                result, staged = ActionResult(Status.KO, "invalid-document", exc.message), None
                attachments = []
            try:
                await self._finish_step(
                    step, intent, result, staged, state, rescue=rescue, attachments=attachments
                )
            except EntryChanged as exc:
                _add_event(intent, Status.ERR, code="entry-changed", message=exc.message)
                await self._reload_entry(state)
                continue
            return result
        error = TransientError("the silo entry kept changing during the step")
        final = await self._reschedule(step, intent, state, error)
        if final is not None:
            await self._finish_step(step, intent, final, None, state, rescue=rescue)
        return final

    def _schema_mismatch(self, step: Step, state: RunState) -> str | None:
        wanted = state.workflow.schema_
        if not wanted or state.entry is None or step is not state.workflow.steps[0]:
            return None
        actual = document_schema(state.entry.envelope)
        if actual is not None and actual.endswith(wanted):
            return None
        return f"workflow {state.workflow.id} takes {wanted} documents; this one is {actual}"

    # Execution

    async def _execute(
        self, step: Step, spec: ActionSpec, intent: Intent, state: RunState
    ) -> ActionResult | None:
        """Run the action with in-place retries; None means the job was rescheduled."""
        _add_event(intent, Status.RUN)
        try:
            config = spec.parse_config(step.config)
        except ValidationError as exc:
            return ActionResult(Status.KO, "invalid-config", _first_error(exc))
        try:
            result = await self._attempts(step, spec, config, intent, state)
        except TransientError as exc:
            return await self._reschedule(step, intent, state, exc)
        except TimeoutError:
            timeout = step.timeout or self.settings.step_timeout_s
            return ActionResult(Status.TIMEOUT, "timeout", f"step ran past {timeout:g} s")
        if result.status is Status.QUEUED:
            return await self._reschedule(step, intent, state, None, queued=result)
        return result

    async def _attempts(
        self, step: Step, spec: ActionSpec, config: Any, intent: Intent, state: RunState
    ) -> ActionResult:
        timeout = step.timeout or self.settings.step_timeout_s
        ctx = self._context(step, config, state)

        def record_retry(retry_state: RetryCallState) -> None:
            error = retry_state.outcome.exception() if retry_state.outcome else None
            _add_event(intent, Status.ERR, code="transient", message=str(error))
            log.warning(
                "step.retrying",
                job_id=state.job.id,
                step_id=step.id,
                action=step.action,
                attempt=retry_state.attempt_number,
                delay_ms=round((retry_state.upcoming_sleep or 0) * 1000),
                error=str(error),
            )

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.settings.retry_inline_attempts),
            wait=wait_exponential(
                multiplier=self.settings.retry_inline_initial_s,
                max=self.settings.retry_inline_max_s,
            )
            + wait_random(0, self.settings.retry_inline_initial_s),
            # A raiser that names its own delay goes straight to the durable schedule.
            retry=retry_if_exception(
                lambda exc: isinstance(exc, TransientError) and exc.retry_in_s is None
            ),
            before_sleep=record_retry,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                try:
                    async with asyncio.timeout(timeout):
                        result = await spec.run(ctx)
                    return _checked(result, step)
                except (TransientError, TimeoutError, asyncio.CancelledError):
                    raise
                except Exception as exc:
                    log.exception(
                        "step.crashed", job_id=state.job.id, step_id=step.id, action=step.action
                    )
                    return ActionResult(Status.KO, "action-error", f"{type(exc).__name__}: {exc}")
        raise AssertionError("tenacity ended without a result")  # pragma: no cover

    def _context(self, step: Step, config: Any, state: RunState) -> StepContext[Any]:
        job = state.job
        entry = state.entry
        return StepContext(
            job_id=job.id,
            workspace_id=job.workspace_id,
            workflow_id=job.workflow_id,
            step_id=step.id or "",
            key=job.key,
            tags=tuple(job.tags),
            meta=dict(job.meta),
            config=config,
            envelope=clone_json(entry.envelope) if entry else None,
            entry_id=entry.id if entry else None,
            entry_state=entry.state if entry else None,
            entry_folder=entry.folder if entry else None,
            services=self.services.for_entry(job.workspace_id, entry.id if entry else None),
            faults=[fault.model_dump() for fault in job.faults],
        )

    async def _store_attachments(self, result: ActionResult, state: RunState) -> list[Attachment]:
        """Store the files an OK result produced and return their attachment records."""
        if result.status is not Status.OK or not result.attachments:
            return []
        records = []
        for new in result.attachments:
            file_id = str(uuid6.uuid7())
            await self.store.put_file(
                StoredFile(state.job.workspace_id, file_id, new.name, new.mime, new.data)
            )
            records.append(
                Attachment(
                    id=file_id,
                    key=new.key,
                    name=new.name,
                    desc=new.desc,
                    mime=new.mime,
                    size=len(new.data),
                    hash=hashlib.sha256(new.data).hexdigest(),
                    category=new.category,
                )
            )
        return records

    def _staged_entry(
        self, result: ActionResult, state: RunState, attachments: list[Attachment]
    ) -> EntryRecord | None:
        """Return the entry as an OK result leaves it, or None when it does not change it.

        A new entry (the step created the document) has ``rev`` -1.
        """
        if result.status is not Status.OK:
            return None
        envelope = None
        if result.envelope is not None:
            envelope = _checked_envelope(result.envelope, state.entry)
        elif result.document is not None:
            if state.entry is None:
                envelope = normalise_envelope(result.document)
            else:
                envelope = replace_document(state.entry.envelope, result.document)
        unchanged = result.entry_state is None and result.entry_folder is None
        if envelope is None and unchanged and (not attachments or state.entry is None):
            return None
        now = utc_now()
        if state.entry is None:
            if envelope is None:
                return None
            return EntryRecord(
                id=str(uuid6.uuid7()),
                workspace_id=state.job.workspace_id,
                state=result.entry_state,
                folder=result.entry_folder,
                envelope=envelope,
                created_at=now,
                updated_at=now,
                rev=-1,
            )
        # A shallow copy is enough: every field that changes is replaced, not mutated.
        entry = state.entry.model_copy()
        if envelope is not None:
            entry.envelope = envelope
        if result.entry_state is not None:
            entry.state = result.entry_state
        if result.entry_folder is not None:
            entry.folder = result.entry_folder
        entry.attachments = _merge_attachments(entry.attachments, attachments)
        entry.updated_at = now
        return entry

    async def _reload_entry(self, state: RunState) -> None:
        job = state.job
        if job.silo_entry_id is not None:
            state.entry = await self.store.get_entry(job.workspace_id, job.silo_entry_id)

    # Persisting

    async def _finish_step(
        self,
        step: Step,
        intent: Intent,
        result: ActionResult,
        staged: EntryRecord | None,
        state: RunState,
        *,
        rescue: bool,
        attachments: list[Attachment] | None = None,
    ) -> None:
        """Store the step's final event, with the entry it changed, in one write."""
        now = utc_now()
        final = intent.model_copy()
        _add_event(final, result.status, code=result.code, message=result.message, now=now)
        final.completed = True
        outcome = StepOutcome(result.status, result.code)
        fault = None
        if result.status in (Status.KO, Status.TIMEOUT) and (
            _forced_fault(outcome) or _matching_block(step, outcome) is None
        ):
            fault = Fault(
                action=step.action,
                code=result.code or str(result.status).lower(),
                message=result.message or f"step {step.id} ended with {result.status}",
            )
        entry, expected_rev = await self._entry_write(staged)
        meta = dict(result.meta)

        def record(job: JobRecord) -> None:
            _put_intent(job, final)
            job.status = result.status
            job.meta.update(meta)
            job.attempts = 0
            job.next_attempt_at = None
            job.updated_at = now
            if staged is not None:
                job.silo_entry_id = staged.id
            if attachments:
                job.attachments = _merge_attachments(job.attachments, attachments)
            if fault is not None:
                job.faults.append(fault)

        await state.handle.write(record, entry=entry, expected_entry_rev=expected_rev)
        if staged is not None:
            state.entry = entry or staged
        state.done[step.id or ""] = final
        if fault is not None:
            log.info(
                "step.failed",
                job_id=state.job.id,
                step_id=step.id,
                action=step.action,
                code=fault.code,
                rescue=bool(state.workflow.rescue) and not rescue,
            )

    async def _entry_write(
        self, staged: EntryRecord | None
    ) -> tuple[EntryRecord | None, int | None]:
        """Return the entry to store with the step and the revision it replaces.

        A new entry is inserted here, before the job that points at it is written.
        """
        if staged is None:
            return None, None
        if staged.rev == -1:
            staged.rev = 0
            existing = await self.store.insert_entry(staged)
            if existing is not None and existing.envelope != staged.envelope:
                raise EntryChanged(f"silo entry {staged.id} exists already with another document")
            return None, None
        return staged.model_copy(update={"rev": staged.rev + 1}), staged.rev

    async def _reschedule(
        self,
        step: Step,
        intent: Intent,
        state: RunState,
        error: TransientError | None,
        *,
        queued: ActionResult | None = None,
    ) -> ActionResult | None:
        """Store the step as waiting and release the job until its next attempt."""
        now = utc_now()
        job = state.job
        attempt = job.attempts + 1
        if queued is not None:
            delay = queued.retry_in_s or retry_delay_s(attempt, self.settings)
        else:
            assert error is not None
            delay = error.retry_in_s or retry_delay_s(attempt, self.settings)
        waited = (now - intent.created_at).total_seconds()
        if waited + delay > self.settings.retry_total_s:
            reason = error.message if error is not None else None
            if queued is not None:
                reason = queued.message
            return ActionResult(
                Status.KO,
                "retries-exhausted",
                f"step kept failing for {waited:.0f} s; last error: {reason}",
            )
        next_at = now + timedelta(seconds=delay)
        if queued is not None:
            _add_event(intent, Status.QUEUED, code=queued.code, message=queued.message, now=now)
        else:
            assert error is not None
            _add_event(intent, Status.ERR, code="transient", message=error.message, now=now)

        def record(record: JobRecord) -> None:
            _put_intent(record, intent)
            record.status = intent.events[-1].status
            record.attempts = attempt
            record.next_attempt_at = next_at
            record.due_at = next_at
            record.owner = None
            record.updated_at = now

        await state.handle.write(record)
        log.warning(
            "job.rescheduled",
            job_id=job.id,
            workspace_id=job.workspace_id,
            workflow_id=job.workflow_id,
            step_id=step.id,
            action=step.action,
            attempt=attempt,
            next_attempt_at=next_at.isoformat(),
            error=error.message if error else None,
        )
        return None

    async def _complete(self, state: RunState) -> None:
        now = utc_now()
        envelope = state.entry.envelope if state.entry else None
        event_name = JOB_FAILED if state.job.faults else JOB_COMPLETED
        event = new_event(event_name, now)

        def record(job: JobRecord) -> None:
            job.completed_at = now
            job.updated_at = now
            job.due_at = None
            job.owner = None
            job.envelope = envelope
            job.outbox.append(event)
            claim_completion(job, now)
            job.refresh_outbox_due(self.outbox.retry_after_s)

        stored = await state.handle.write(record)
        elapsed_ms = (now - stored.created_at).total_seconds() * 1000
        log.info(
            event_name,
            job_id=stored.id,
            workspace_id=stored.workspace_id,
            workflow_id=stored.workflow_id,
            status=str(stored.status),
            faults=len(stored.faults),
            duration_ms=round(elapsed_ms, 1),
        )
        sending = [item.id for item in stored.outbox if item.state == "sending"]
        await self.outbox.deliver(state.handle, sending)


def _open_intent(job: JobRecord, step: Step) -> Intent:
    """Return the step's unfinished intent (a retry), or a new one."""
    for intent in job.intents:
        if intent.step_id == step.id and not intent.completed:
            return intent.model_copy()
    now = utc_now()
    return Intent(
        id=str(uuid6.uuid7()),
        step_id=step.id or "",
        name=step.name,
        action=step.action,
        created_at=now,
        updated_at=now,
    )


def _put_intent(job: JobRecord, intent: Intent) -> None:
    # Intents are shared between the job and the runner, which is safe because events
    # are only ever added by replacing the list (see _add_event), never in place.
    for index, existing in enumerate(job.intents):
        if existing.id == intent.id:
            job.intents[index] = intent.model_copy()
            return
    job.intents.append(intent.model_copy())


def _add_event(
    intent: Intent,
    status: Status,
    *,
    code: str | None = None,
    message: str | None = None,
    now: datetime | None = None,
) -> None:
    at = now or utc_now()
    event = Event(index=len(intent.events), status=status, at=at, code=code, message=message)
    intent.events = [*intent.events, event]
    intent.updated_at = at


def _checked_envelope(envelope: dict[str, Any], entry: EntryRecord | None) -> dict[str, Any]:
    """Return an envelope an action produced, normalised.

    When the document and its digest are those of the stored entry (the action only
    added a signature, say), the digest is known to be right and is not computed again.
    """
    if entry is not None:
        stored = entry.envelope
        head = envelope.get("head")
        same_document = envelope.get("doc") == stored.get("doc")
        if same_document and isinstance(head, dict) and head == stored.get("head"):
            return envelope
    return normalise_envelope(envelope)


def clone_json(value: Any) -> Any:
    """Copy a JSON-like value (dicts, lists, scalars); several times faster than deepcopy."""
    if isinstance(value, dict):
        return {key: clone_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [clone_json(item) for item in value]
    return value


def _checked(result: object, step: Step) -> ActionResult:
    """Return an action's result, or a KO when it returned something it may not."""
    if isinstance(result, ActionResult) and result.status in RESULT_STATUSES:
        return result
    got = result.status if isinstance(result, ActionResult) else type(result).__name__
    return ActionResult(
        Status.KO,
        "invalid-result",
        f"action {step.action} returned {got}; actions return an ActionResult with status "
        "OK, SKIP, KO or QUEUED, and raise TransientError to be retried",
    )


def _merge_attachments(current: list[Attachment], new: list[Attachment]) -> list[Attachment]:
    """Return ``current`` with ``new`` added; a new attachment replaces one with its key."""
    keys = {attachment.key for attachment in new}
    return [a for a in current if a.key not in keys] + list(new)


def _matching_block(step: Step, outcome: StepOutcome) -> Next | None:
    for block in step.next:
        if block.matches(outcome.status, outcome.code):
            return block
    return None


def _forced_fault(outcome: StepOutcome) -> bool:
    # A document of the wrong type is always a fault; no next block can take it.
    return outcome.status is Status.KO and outcome.code == "schema-mismatch"


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"config {where}: {error['msg']}" if where else f"config: {error['msg']}"


__all__ = ["FINAL_STATUSES", "Flow", "Runner", "ServicesFactory", "StoreUnavailable"]
