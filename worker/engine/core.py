"""The engine: handles commands, runs jobs within a capacity, and sweeps the store.

The consumer hands each delivery to ``Engine.handle`` and settles the message by the
returned ``Settlement``, and nothing here uses the broker's types. A create-job
command is acknowledged as soon as its job is stored: from then on the store, not
the delivery, owns the job. A job's runner has a lease that it renews. When a worker
dies, its jobs come due again as their leases end, and the sweeper of any live worker
claims and resumes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from datetime import timedelta
from typing import Any

import structlog
import uuid6
from structlog.contextvars import bound_contextvars

from contracts import Fault, Workflow
from contracts.timestamps import utc_now
from worker.actions.registry import ActionRegistry
from worker.engine.capacity import Capacity
from worker.engine.commands import Commands, Settlement
from worker.engine.handle import JobHandle, claim
from worker.engine.messages import JOB_FAILED, Delivery, Publisher
from worker.engine.outbox import Outbox, claim_completion, new_event
from worker.engine.runner import Runner
from worker.engine.services import ServicesFactory
from worker.errors import FencedOut, StoreUnavailable, TransientError
from worker.metrics import Metrics
from worker.models import EntryRecord, JobRecord, WorkflowRecord
from worker.settings import Settings
from worker.store.base import Store

log = structlog.get_logger("worker.engine")

__all__ = ["Capacity", "Engine", "Settlement"]


class Engine:
    """Everything between a decoded command and the store, for one worker process."""

    def __init__(
        self,
        store: Store,
        publisher: Publisher,
        registry: ActionRegistry,
        services: ServicesFactory,
        settings: Settings,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.owner = f"worker-{uuid6.uuid7()}"
        self.capacity = Capacity(settings.prefetch)
        self.metrics.jobs_in_flight.set_function(lambda: len(self.running))
        self.outbox = Outbox(publisher, retry_after_s=settings.outbox_retry_s, metrics=self.metrics)
        self.runner = Runner(store, registry, services, self.outbox, settings, self.metrics)
        self.running: dict[str, tuple[JobHandle, asyncio.Task[None]]] = {}
        self._workflows: dict[tuple[str, str, str], WorkflowRecord] = {}
        self._timers: set[asyncio.TimerHandle] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()
        self._wake_sweeper = asyncio.Event()
        self.commands = Commands(
            store,
            publisher,
            self.outbox,
            settings,
            self.metrics,
            self.capacity,
            owner=self.owner,
            start_job=lambda handle, workflow, entry: self._start(
                handle, workflow, accepted=True, entry=entry
            ),
            schedule_deadline=self._schedule_deadline,
            stopping=self._stopping,
        )

    async def handle(self, delivery: Delivery) -> Settlement:
        """Process one command and return how to settle its message."""
        return await self.commands.handle(delivery)

    # Running jobs

    def _start(
        self,
        handle: JobHandle,
        workflow: Workflow,
        *,
        accepted: bool,
        entry: EntryRecord | None = None,
    ) -> None:
        """Run a job this worker owns in a task; the caller already took a capacity slot."""
        task = asyncio.create_task(self._run(handle, workflow, accepted=accepted, entry=entry))
        self.running[handle.job_id] = (handle, task)
        for item in handle.record.outbox:
            if item.kind == "reply" and item.state == "pending" and item.deadline is not None:
                self._schedule_deadline(handle.job_id, item.id, item.deadline.timestamp())

    async def _run(
        self,
        handle: JobHandle,
        workflow: Workflow,
        *,
        accepted: bool,
        entry: EntryRecord | None = None,
    ) -> None:
        job = handle.record
        with bound_contextvars(
            job_id=job.id, workspace_id=job.workspace_id, workflow_id=job.workflow_id
        ):
            try:
                if accepted:
                    sending = [item.id for item in job.outbox if item.state == "sending"]
                    await self.outbox.deliver(handle, sending, defer_mark=True)
                else:
                    log.info("job.resumed", fence=handle.fence, intents=len(job.intents))
                await self.runner.run(handle, workflow, entry=entry)
            except FencedOut:
                log.warning("job.fenced", fence=handle.fence)
            except StoreUnavailable as exc:
                # The lease runs out and the job is claimed again once the store is back.
                log.warning("job.interrupted", error=str(exc))
            except asyncio.CancelledError:
                await asyncio.shield(self._release(handle))
                raise
            except Exception as exc:
                log.exception("job.crashed")
                await self._fail(handle, exc)
            finally:
                self.running.pop(job.id, None)
                await self.capacity.release()

    async def _release(self, handle: JobHandle) -> None:
        """Give a job back so that another worker resumes it at once."""

        def release(record: JobRecord) -> None:
            if record.completed_at is None and record.owner == self.owner:
                record.owner = None
                record.due_at = utc_now()

        try:
            await handle.write(release)
            log.info("job.released", job_id=handle.job_id)
        except (FencedOut, StoreUnavailable) as exc:
            log.warning("job.release_failed", job_id=handle.job_id, error=str(exc))

    async def _fail(self, handle: JobHandle, exc: Exception) -> None:
        """Complete a job whose run crashed, with a fault, so that it cannot crash again."""
        now = utc_now()

        def record(job: JobRecord) -> None:
            if job.completed_at is not None:
                return
            job.faults.append(Fault(code="internal-error", message=f"{type(exc).__name__}: {exc}"))
            job.completed_at = now
            job.updated_at = now
            job.due_at = None
            job.owner = None
            job.outbox.append(new_event(JOB_FAILED, now))
            self.metrics.jobs_failed.labels(job.workflow_id).inc()
            claim_completion(job, now)
            job.refresh_outbox_due(self.settings.outbox_retry_s)

        try:
            stored = await handle.write(record)
            sending = [item.id for item in stored.outbox if item.state == "sending"]
            await self.outbox.deliver(handle, sending)
        except Exception as error:
            # The job keeps its lease until it ends; another claim tries again then.
            log.warning("job.fail_not_recorded", error=repr(error))

    def _schedule_deadline(self, job_id: str, item_id: str, at_epoch_s: float) -> None:
        loop = asyncio.get_running_loop()
        delay = max(0.0, at_epoch_s - time.time())

        def fire() -> None:
            self._timers.discard(timer)
            self._spawn(self._deadline_reply(job_id, item_id))

        timer = loop.call_later(delay, fire)
        self._timers.add(timer)

    async def _deadline_reply(self, job_id: str, item_id: str) -> None:
        try:
            record = await self.store.get_job(job_id)
            if record is not None:
                await self.outbox.send_deadline_reply(JobHandle(self.store, record), item_id)
        except TransientError as exc:
            # The sweeper sends it once the store or broker is back.
            log.warning("reply.deadline_failed", job_id=job_id, error=str(exc))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # Background loops

    async def sweep_forever(self) -> None:
        """Claim due jobs and deliver overdue outbox items until stopped."""
        while not self._stopping.is_set():
            try:
                await self.sweep_once()
            except TransientError as exc:
                log.warning("sweeper.failed", error=str(exc))
            self._wake_sweeper.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._wake_sweeper.wait(), timeout=self.settings.sweep_interval_s
                )

    async def sweep_once(self) -> None:
        now = utc_now()
        if self.capacity.free > 0:
            for record in await self.store.due_jobs(now, self.capacity.free):
                if record.id in self.running or not self.capacity.try_acquire():
                    continue
                started = False
                try:
                    handle = await claim(
                        self.store, record, owner=self.owner, lease_s=self.settings.lease_s
                    )
                    workflow = await self._workflow(record) if handle else None
                    if handle is not None and workflow is not None:
                        self._start(handle, workflow.workflow, accepted=False)
                        started = True
                finally:
                    # A claim that failed, or raised, must not keep the slot it took.
                    if not started:
                        await self.capacity.release()
        for record in await self.store.due_outboxes(now, 100):
            await self.outbox.recover(JobHandle(self.store, record))

    async def renew_leases_forever(self) -> None:
        """Extend the lease of every running job, every third of the lease."""
        # Runs on through the shutdown grace period: draining jobs still need their
        # leases, or another worker would claim them while they finish here.
        interval = self.settings.lease_s / 3
        while True:
            await asyncio.sleep(interval)
            for handle, _ in list(self.running.values()):
                await self._renew(handle)

    async def _renew(self, handle: JobHandle) -> None:
        record = handle.record
        if record.completed_at is not None or record.owner != self.owner:
            return
        until = utc_now() + timedelta(seconds=self.settings.lease_s)

        def extend(job: JobRecord) -> None:
            if job.completed_at is None and job.owner == self.owner:
                job.due_at = until

        try:
            await handle.write(extend)
        except (FencedOut, TransientError) as exc:
            log.warning("lease.renew_failed", job_id=handle.job_id, error=str(exc))

    async def _workflow(self, record: JobRecord) -> WorkflowRecord | None:
        key = (record.workspace_id, record.workflow_id, record.workflow_version)
        cached = self._workflows.get(key)
        if cached is None:
            cached = await self.store.get_workflow(*key)
            if cached is None:
                log.error("job.workflow_missing", job_id=record.id, version=key[2])
                return None
            self._workflows[key] = cached
        return cached

    # Shutdown

    async def stop_accepting(self) -> None:
        """Stop taking work: waiting commands are requeued, the sweeper claims no more."""
        self._stopping.set()
        self._wake_sweeper.set()
        await self.capacity.close()

    async def drain(self, grace_s: float, *, cut_short: asyncio.Event | None = None) -> int:
        """Wait up to ``grace_s`` for running jobs, then cancel and release the rest.

        Setting ``cut_short`` ends the wait at once (a second SIGTERM). Returns how many
        jobs were cancelled.
        """
        pending: set[asyncio.Future[Any]] = {task for _, task in self.running.values()}
        if pending:
            log.info("worker.draining", running=len(pending), grace_s=grace_s)
            await _wait_unless_cut_short(pending, grace_s, cut_short)
        leftovers = [task for _, task in self.running.values() if not task.done()]
        for task in leftovers:
            task.cancel()
        if leftovers:
            await asyncio.gather(*leftovers, return_exceptions=True)
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        background = list(self._background)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        return len(leftovers)


async def _wait_unless_cut_short(
    pending: set[asyncio.Future[Any]], timeout_s: float, cut_short: asyncio.Event | None
) -> None:
    """Wait for every future, for ``timeout_s`` at most, or until ``cut_short`` is set."""
    if cut_short is None:
        await asyncio.wait(pending, timeout=timeout_s)
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    signal = asyncio.ensure_future(cut_short.wait())
    try:
        while pending and not cut_short.is_set():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            _, pending = await asyncio.wait(
                pending | {signal}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            pending.discard(signal)
    finally:
        signal.cancel()
