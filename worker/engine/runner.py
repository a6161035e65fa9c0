"""Runs a claimed job's workflow, step by step, resuming where an earlier run stopped.

Resuming is replay: the flow is walked from the start, and a step with a completed
intent is not run again. Its recorded status and code steer the flow as they did the
first time, so the first step without a completed intent is the first to run.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from enum import Enum
from typing import Any

import structlog
from pydantic import ValidationError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from contracts import Intent, Status, Step, Workflow
from contracts.timestamps import utc_now
from worker.actions.base import ActionResult, ActionSpec, StepContext
from worker.actions.registry import ActionRegistry
from worker.engine.handle import EntryChanged, JobHandle
from worker.engine.outbox import Outbox
from worker.engine.recorder import Recorder, RunState
from worker.engine.services import ServicesFactory
from worker.engine.steps import (
    StepOutcome,
    add_event,
    checked_result,
    clone_json,
    first_config_error,
    forced_fault,
    matching_block,
    open_intent,
)
from worker.errors import TransientError, Unprocessable
from worker.gobl.envelope import document_schema
from worker.metrics import Metrics
from worker.models import EntryRecord, JobRecord
from worker.settings import Settings
from worker.store.base import Store

log = structlog.get_logger("worker.runner")

#: Times a run starts over because the silo entry changed under it, before the job is
#: released to be tried again after ``retry_first_s``.
MAX_RESTARTS = 3


class Flow(Enum):
    """The way a list of steps ended."""

    CONTINUE = "continue"
    STOP = "stop"
    FAILED = "failed"
    WAITING = "waiting"


class Runner:
    """Runs jobs; one instance serves every job of the worker."""

    def __init__(
        self,
        store: Store,
        registry: ActionRegistry,
        services: ServicesFactory,
        outbox: Outbox,
        settings: Settings,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.services = services
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.recorder = Recorder(store, outbox, settings, self.metrics)

    async def run(
        self, handle: JobHandle, workflow: Workflow, *, entry: EntryRecord | None = None
    ) -> Flow:
        """Run or resume the job until it completes or waits for a retry.

        ``entry`` is the job's silo entry when the caller has it; otherwise it is read.
        """
        for _ in range(MAX_RESTARTS):
            job = handle.record
            if entry is None and job.silo_entry_id is not None:
                entry = await self.store.get_entry(job.workspace_id, job.silo_entry_id)
            state = RunState(handle, workflow, entry)
            try:
                return await self._run_flow(state)
            except EntryChanged as exc:
                # Progress not yet written is dropped; replay redoes it on the new entry.
                log.info("job.restarted", job_id=job.id, reason=exc.message)
                entry = None
        await self._release_for_retry(handle)
        return Flow.WAITING

    async def _run_flow(self, state: RunState) -> Flow:
        flow = await self._run_steps(state.workflow.steps, state, rescue=False)
        if flow is Flow.FAILED:
            flow = await self._run_steps(state.workflow.rescue, state, rescue=True)
        if flow is not Flow.WAITING:
            await self.recorder.complete(state)
        return flow

    async def _release_for_retry(self, handle: JobHandle) -> None:
        due = utc_now() + timedelta(seconds=self.settings.retry_first_s)

        def release(job: JobRecord) -> None:
            job.due_at = due
            job.owner = None

        await handle.write(release)
        log.warning(
            "job.restarts_exhausted",
            job_id=handle.job_id,
            restarts=MAX_RESTARTS,
            retry_in_s=self.settings.retry_first_s,
        )

    # Flow

    async def _run_steps(self, steps: list[Step], state: RunState, *, rescue: bool) -> Flow:
        for step in steps:
            outcome = await self._run_step(step, state, rescue=rescue)
            if outcome is None:
                return Flow.WAITING
            block = None if forced_fault(outcome) else matching_block(step, outcome)
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
        intent = open_intent(state.job, step)
        result = await self._result(step, intent, state, rescue=rescue)
        if result is None:
            return None
        elapsed = time.monotonic() - started
        self.metrics.step_duration.labels(step.action, str(result.status)).observe(elapsed)
        log.info(
            "step.finished",
            job_id=state.job.id,
            workspace_id=state.job.workspace_id,
            workflow_id=state.job.workflow_id,
            step_id=step.id,
            action=step.action,
            status=str(result.status),
            code=result.code,
            duration_ms=round(elapsed * 1000, 1),
        )
        return StepOutcome(result.status, result.code)

    async def _result(
        self, step: Step, intent: Intent, state: RunState, *, rescue: bool
    ) -> ActionResult | None:
        """Produce and record the step's final result; None when it was rescheduled."""
        spec = self.registry.get(step.action)
        preset = None
        if spec is None:
            preset = ActionResult(
                Status.KO, "unknown-action", f"action {step.action!r} is not installed"
            )
        elif (mismatch := self._schema_mismatch(step, state)) is not None:
            preset = ActionResult(Status.KO, "schema-mismatch", mismatch)
        if preset is not None:
            add_event(intent, Status.RUN)
            await self.recorder.record_step(step, intent, preset, state, rescue=rescue)
            return preset

        assert spec is not None
        add_event(intent, Status.RUN)
        if not spec.idempotent:
            # Earlier results reach the store before an action with outside effects runs,
            # with this step's RUN event, so the job shows what it is waiting for.
            await self.recorder.record_start(intent, state)
        result = await self._execute(step, spec, intent, state)
        if result is None:
            return None
        attachments = await self.recorder.store_attachments(result, state)
        try:
            staged = self.recorder.staged_entry(result, state, attachments)
        except Unprocessable as exc:
            result = ActionResult(Status.KO, "invalid-document", exc.message)
            staged, attachments = None, []
        await self.recorder.record_step(
            step,
            intent,
            result,
            state,
            staged=staged,
            attachments=attachments,
            rescue=rescue,
            write_now=not spec.idempotent,
        )
        return result

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
        try:
            config = spec.parse_config(step.config)
        except ValidationError as exc:
            return ActionResult(Status.KO, "invalid-config", first_config_error(exc))
        try:
            result = await self._attempts(step, spec, config, intent, state)
        except TransientError as exc:
            return await self.recorder.reschedule(step, intent, state, exc)
        except TimeoutError:
            timeout = step.timeout or self.settings.step_timeout_s
            return ActionResult(Status.TIMEOUT, "timeout", f"step ran past {timeout:g} s")
        if result.status is Status.QUEUED:
            return await self.recorder.reschedule(step, intent, state, None, queued=result)
        return result

    async def _attempts(
        self, step: Step, spec: ActionSpec, config: Any, intent: Intent, state: RunState
    ) -> ActionResult:
        timeout = step.timeout or self.settings.step_timeout_s
        ctx = self._context(step, spec, config, state)

        def record_retry(retry_state: RetryCallState) -> None:
            error = retry_state.outcome.exception() if retry_state.outcome else None
            add_event(intent, Status.ERR, code="transient", message=str(error))
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
                    return checked_result(result, step)
                except (TransientError, TimeoutError, asyncio.CancelledError):
                    raise
                except Exception as exc:
                    log.exception(
                        "step.crashed", job_id=state.job.id, step_id=step.id, action=step.action
                    )
                    return ActionResult(Status.KO, "action-error", f"{type(exc).__name__}: {exc}")
        raise AssertionError("tenacity ended without a result")  # pragma: no cover

    def _context(
        self, step: Step, spec: ActionSpec, config: Any, state: RunState
    ) -> StepContext[Any]:
        job = state.job
        entry = state.entry
        envelope = None
        if entry is not None:
            envelope = clone_json(entry.envelope) if spec.copy_envelope else entry.envelope
        return StepContext(
            job_id=job.id,
            workspace_id=job.workspace_id,
            workflow_id=job.workflow_id,
            step_id=step.id or "",
            key=job.key,
            tags=tuple(job.tags),
            meta=state.meta,
            config=config,
            envelope=envelope,
            entry_id=entry.id if entry else None,
            entry_state=entry.state if entry else None,
            entry_folder=entry.folder if entry else None,
            services=self.services.for_entry(job.workspace_id, entry.id if entry else None),
            faults=[fault.model_dump() for fault in state.faults],
        )
