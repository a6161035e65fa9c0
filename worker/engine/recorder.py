"""Recording a run's progress: step results, the entry they change, waits and completion.

Results of idempotent actions (the built-in silo, sequence and pdf actions) are kept in
memory and written with the next write that has to happen. That write comes before
and after a step whose action is not idempotent (a webhook), when the job waits for a
retry, and at completion. After its insert, a three-step job of built-in actions is
therefore written once, at its end, instead of once per step. A worker that dies in
between runs those steps again on resume, which changes nothing because they are
idempotent: ``sequence.enumerate`` gets back the number already tied to the entry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import timedelta

import structlog
import uuid6

from contracts import Attachment, Fault, Intent, Status, Step, Workflow
from contracts.timestamps import utc_now
from worker.actions.base import ActionResult
from worker.engine.handle import EntryChanged, JobHandle
from worker.engine.messages import JOB_COMPLETED, JOB_FAILED
from worker.engine.outbox import Outbox, claim_completion, new_event
from worker.engine.schedule import retry_delay_s
from worker.engine.steps import (
    StepOutcome,
    add_event,
    checked_envelope,
    merge_attachments,
    put_intent,
    unhandled,
)
from worker.errors import TransientError
from worker.gobl.envelope import normalise_envelope, replace_document
from worker.metrics import Metrics
from worker.models import EntryRecord, JobRecord
from worker.settings import Settings
from worker.store.base import Store, StoredFile

log = structlog.get_logger("worker.runner")

Mutation = Callable[[JobRecord], None]


class RunState:
    """One run of a job: the workflow, the entry, finished steps and unwritten progress."""

    def __init__(self, handle: JobHandle, workflow: Workflow, entry: EntryRecord | None) -> None:
        self.handle = handle
        self.workflow = workflow
        #: The entry as the steps so far left it; ``entry_rev`` is its stored revision.
        self.entry = entry
        self.entry_rev = entry.rev if entry is not None else None
        self.entry_dirty = False
        self.done = {i.step_id: i for i in handle.record.intents if i.completed}
        #: Changes to the job that are not written yet, applied in order by flush().
        self.pending: list[Mutation] = []
        self.pending_meta: dict[str, str] = {}
        self.pending_faults: list[Fault] = []
        self.attempts_reset = False

    @property
    def job(self) -> JobRecord:
        """The job as last written."""
        return self.handle.record

    @property
    def meta(self) -> dict[str, str]:
        return {**self.job.meta, **self.pending_meta}

    @property
    def faults(self) -> list[Fault]:
        return [*self.job.faults, *self.pending_faults]

    @property
    def attempts(self) -> int:
        """Scheduled retries of the step that is waiting; 0 once a later step finished."""
        return 0 if self.attempts_reset else self.job.attempts


class Recorder:
    """Turns step results into job and entry writes."""

    def __init__(self, store: Store, outbox: Outbox, settings: Settings, metrics: Metrics) -> None:
        self.store = store
        self.outbox = outbox
        self.settings = settings
        self.metrics = metrics

    # Step results

    async def store_attachments(self, result: ActionResult, state: RunState) -> list[Attachment]:
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

    def staged_entry(
        self, result: ActionResult, state: RunState, attachments: list[Attachment]
    ) -> EntryRecord | None:
        """Return the entry as an OK result leaves it, or None when it does not change it.

        A new entry (the step created the document) has ``rev`` -1. Raises
        Unprocessable when the result's document or envelope is not valid GOBL.
        """
        if result.status is not Status.OK:
            return None
        envelope = None
        if result.envelope is not None:
            envelope = checked_envelope(result.envelope, state.entry)
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
        entry.attachments = merge_attachments(entry.attachments, attachments)
        entry.updated_at = now
        return entry

    async def record_step(
        self,
        step: Step,
        intent: Intent,
        result: ActionResult,
        state: RunState,
        *,
        staged: EntryRecord | None = None,
        attachments: list[Attachment] | None = None,
        rescue: bool = False,
        write_now: bool = False,
    ) -> None:
        """Record a step's final result; written now, or with the next write."""
        now = utc_now()
        final = intent.model_copy()
        add_event(final, result.status, code=result.code, message=result.message, now=now)
        final.completed = True
        fault = None
        if unhandled(step, StepOutcome(result.status, result.code)):
            fault = Fault(
                action=step.action,
                code=result.code or str(result.status).lower(),
                message=result.message or f"step {step.id} ended with {result.status}",
            )
        new_entry_id = None
        if staged is not None and staged.rev == -1:
            # A step created the document: the entry is inserted at once and the job
            # pointing at it is written right after, so a resumed run cannot make a
            # second entry (and take a second number for it).
            await self._insert_entry(staged)
            state.entry, state.entry_rev = staged, staged.rev
            new_entry_id = staged.id
            write_now = True
        elif staged is not None:
            state.entry, state.entry_dirty = staged, True
        meta = dict(result.meta)
        added = list(attachments or [])

        def record(job: JobRecord) -> None:
            put_intent(job, final)
            job.status = result.status
            job.meta.update(meta)
            job.attempts = 0
            job.next_attempt_at = None
            job.updated_at = now
            if new_entry_id is not None:
                job.silo_entry_id = new_entry_id
            if added:
                job.attachments = merge_attachments(job.attachments, added)
            # Identity, not equality: this mutation may run again on the same record.
            if fault is not None and not any(f is fault for f in job.faults):
                job.faults.append(fault)

        state.pending.append(record)
        state.pending_meta.update(meta)
        state.attempts_reset = True
        if fault is not None:
            state.pending_faults.append(fault)
            log.info(
                "step.failed",
                job_id=state.job.id,
                step_id=step.id,
                action=step.action,
                code=fault.code,
                rescue=bool(state.workflow.rescue) and not rescue,
            )
        state.done[step.id or ""] = final
        if write_now:
            await self.flush(state)

    async def record_start(self, intent: Intent, state: RunState) -> None:
        """Write pending progress and the step's open intent, with the job's status RUN."""
        started = intent.model_copy()

        def record(job: JobRecord) -> None:
            put_intent(job, started)
            job.status = Status.RUN
            job.updated_at = started.updated_at

        await self.flush(state, extra=record)

    async def _insert_entry(self, staged: EntryRecord) -> None:
        staged.rev = 0
        existing = await self.store.insert_entry(staged)
        if existing is not None and existing.envelope != staged.envelope:
            raise EntryChanged(f"silo entry {staged.id} exists already with another document")

    async def flush(self, state: RunState, extra: Mutation | None = None) -> JobRecord:
        """Write every pending change, and ``extra``, in one write with the entry.

        Raises EntryChanged when the entry changed in the store meanwhile; the run then
        starts again from what was written.
        """
        mutations = [*state.pending, *([extra] if extra is not None else [])]
        entry = expected_rev = None
        if state.entry_dirty and state.entry is not None and state.entry_rev is not None:
            expected_rev = state.entry_rev
            entry = state.entry.model_copy(update={"rev": expected_rev + 1})
        if not mutations and entry is None:
            return state.job

        def apply(job: JobRecord) -> None:
            for mutate in mutations:
                mutate(job)

        stored = await state.handle.write(apply, entry=entry, expected_entry_rev=expected_rev)
        state.pending.clear()
        state.pending_meta.clear()
        state.pending_faults.clear()
        state.attempts_reset = False
        if entry is not None:
            state.entry, state.entry_rev, state.entry_dirty = entry, entry.rev, False
        return stored

    # Waiting and completion

    async def reschedule(
        self,
        step: Step,
        intent: Intent,
        state: RunState,
        error: TransientError | None,
        *,
        queued: ActionResult | None = None,
    ) -> ActionResult | None:
        """Write the step as waiting and release the job until its next attempt.

        Returns a KO result instead when the next attempt would fall outside
        ``retry_total_s``.
        """
        now = utc_now()
        attempt = state.attempts + 1
        explicit: float | None = None
        reason: str | None = None
        if queued is not None:
            explicit, reason = queued.retry_in_s, queued.message
        elif error is not None:
            explicit, reason = error.retry_in_s, error.message
        if explicit is None:
            delay = retry_delay_s(attempt, self.settings)
        else:
            # An action may name its delay, but not below the schedule's first step: a
            # Retry-After of 0 s would otherwise retry as fast as the sweeper runs.
            delay = max(explicit, self.settings.retry_first_s)
        waited = (now - intent.created_at).total_seconds()
        if attempt > self.settings.retry_max_attempts:
            return ActionResult(
                Status.KO,
                "retries-exhausted",
                f"step failed {attempt - 1} times over {waited:.0f} s; last error: {reason}",
            )
        if waited + delay > self.settings.retry_total_s:
            return ActionResult(
                Status.KO,
                "retries-exhausted",
                f"step kept failing for {waited:.0f} s; last error: {reason}",
            )
        next_at = now + timedelta(seconds=delay)
        if queued is not None:
            add_event(intent, Status.QUEUED, code=queued.code, message=queued.message, now=now)
        else:
            add_event(intent, Status.ERR, code="transient", message=reason, now=now)
        waiting = intent.model_copy()

        def record(job: JobRecord) -> None:
            put_intent(job, waiting)
            job.status = waiting.events[-1].status
            job.attempts = attempt
            job.next_attempt_at = next_at
            job.due_at = next_at
            job.owner = None
            job.updated_at = now

        await self.flush(state, extra=record)
        self.metrics.retries_scheduled.labels(step.action).inc()
        log.warning(
            "job.rescheduled",
            job_id=state.job.id,
            workspace_id=state.job.workspace_id,
            workflow_id=state.job.workflow_id,
            step_id=step.id,
            action=step.action,
            attempt=attempt,
            next_attempt_at=next_at.isoformat(),
            error=reason,
        )
        return None

    async def complete(self, state: RunState) -> None:
        """Write the job as finished with its pending progress, then send what it owes."""
        now = utc_now()
        envelope = state.entry.envelope if state.entry else None
        event_name = JOB_FAILED if state.faults else JOB_COMPLETED
        event = new_event(event_name, now)

        def record(job: JobRecord) -> None:
            job.completed_at = now
            job.updated_at = now
            job.due_at = None
            job.owner = None
            job.envelope = envelope
            if not any(item is event for item in job.outbox):
                job.outbox.append(event)
            claim_completion(job, now)
            job.refresh_outbox_due(self.outbox.retry_after_s)

        stored = await self.flush(state, extra=record)
        duration_ms = round((now - stored.created_at).total_seconds() * 1000, 1)
        if stored.faults:
            self.metrics.jobs_failed.labels(stored.workflow_id).inc()
            log.info(
                "job.failed",
                job_id=stored.id,
                workspace_id=stored.workspace_id,
                workflow_id=stored.workflow_id,
                status=str(stored.status),
                faults=len(stored.faults),
                fault=stored.faults[0].code,
                duration_ms=duration_ms,
            )
        else:
            self.metrics.jobs_completed.labels(stored.workflow_id).inc()
            log.info(
                "job.completed",
                job_id=stored.id,
                workspace_id=stored.workspace_id,
                workflow_id=stored.workflow_id,
                status=str(stored.status),
                duration_ms=duration_ms,
            )
        sending = [item.id for item in stored.outbox if item.state == "sending"]
        await self.outbox.deliver(state.handle, sending)
