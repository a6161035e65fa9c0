"""The engine: handles commands, runs jobs within a capacity, and sweeps the store.

The consumer hands each delivery to ``Engine.handle`` and settles the message by the
returned ``Settlement``; nothing here uses the broker's types. A create-job
command is acknowledged as soon as its job is stored: from then on the store, not
the delivery, owns the job. A job's runner holds a lease that it renews; when a
worker dies, its jobs come due again when their leases end, and the sweeper of any
live worker claims and resumes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from enum import Enum
from typing import Any, TypeVar

import structlog
import uuid6
from structlog.contextvars import bound_contextvars

from contracts import CREATE_JOB, GET_JOB, CreateJob, Fault, GetJob, Workflow
from contracts.timestamps import utc_now
from worker.actions.registry import ActionRegistry
from worker.engine.handle import JobHandle, claim
from worker.engine.intake import Duplicate, Intake, decode, error_body
from worker.engine.messages import (
    JOB_COMPLETED,
    JOB_FAILED,
    JOB_FOUND,
    JOB_PENDING,
    JOB_REJECTED,
    REPLY_STATUS,
    Delivery,
    Outgoing,
    Publisher,
)
from worker.engine.outbox import Outbox, claim_completion, new_event, new_reply
from worker.engine.runner import Runner
from worker.engine.services import ServicesFactory
from worker.engine.tenancy import WorkspaceUsers
from worker.errors import (
    FencedOut,
    InvalidCommand,
    RejectedError,
    StoreUnavailable,
    TransientError,
    Unprocessable,
)
from worker.metrics import Metrics
from worker.models import EntryRecord, JobRecord, WorkflowRecord
from worker.settings import Settings
from worker.store.base import Store

log = structlog.get_logger("worker.engine")

T = TypeVar("T")


class Settlement(Enum):
    """Settlement of a delivery once the engine is done with it."""

    ACK = "ack"
    REQUEUE = "requeue"


class ShuttingDown(TransientError):
    """The worker is stopping and takes no new work; the command goes back to the queue."""


class Capacity:
    """A counter of job slots shared by the consumer and the sweeper."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._used = 0
        self._closed = False
        self._changed = asyncio.Condition()

    @property
    def free(self) -> int:
        return self.size - self._used

    async def acquire(self) -> None:
        """Wait for a free slot; raise ShuttingDown once the capacity is closed."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._closed or self._used < self.size)
            if self._closed:
                raise ShuttingDown("the worker is stopping")
            self._used += 1

    def try_acquire(self) -> bool:
        if self._closed or self._used >= self.size:
            return False
        self._used += 1
        return True

    async def release(self) -> None:
        async with self._changed:
            self._used -= 1
            self._changed.notify()

    async def close(self) -> None:
        """Refuse every later and waiting acquire."""
        async with self._changed:
            self._closed = True
            self._changed.notify_all()


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
        self.intake = Intake(store, settings, owner=self.owner)
        self.workspaces = WorkspaceUsers(settings.workspace_user_map)
        self.runner = Runner(store, registry, services, self.outbox, settings, self.metrics)
        self.running: dict[str, tuple[JobHandle, asyncio.Task[None]]] = {}
        self._workflows: dict[tuple[str, str, str], WorkflowRecord] = {}
        self._timers: set[asyncio.TimerHandle] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()
        self._wake_sweeper = asyncio.Event()

    # Commands

    async def handle(self, delivery: Delivery) -> Settlement:
        """Process one command and return how to settle its message."""
        with bound_contextvars(
            routing_key=delivery.routing_key, correlation_id=delivery.correlation_id
        ):
            try:
                if delivery.routing_key == CREATE_JOB:
                    return await self._create(delivery)
                if delivery.routing_key == GET_JOB:
                    return await self._get(delivery)
                raise InvalidCommand(
                    f"unknown routing key {delivery.routing_key!r}; "
                    f"commands are {CREATE_JOB} and {GET_JOB}"
                )
            except RejectedError as exc:
                return await self._reject(delivery, exc)
            except (StoreUnavailable, TransientError) as exc:
                # Only reached while stopping: the message goes back for another worker.
                log.warning("command.requeued", error=str(exc))
                return Settlement.REQUEUE
            except Exception as exc:
                return await self._crashed(delivery, exc)

    async def _create(self, delivery: Delivery) -> Settlement:
        command: CreateJob = decode(delivery, CreateJob, self.settings.max_message_bytes)
        command = self.workspaces.scope(command, delivery.user_id)
        await self.capacity.acquire()
        started = False
        try:
            result = await self._retry_store(lambda: self.intake.create(command, delivery))
            if isinstance(result, Duplicate):
                await self._answer_duplicate(result, command, delivery)
                return Settlement.ACK
            self.metrics.jobs_accepted.labels(result.handle.record.workflow_id).inc()
            self._start(result.handle, result.workflow.workflow, accepted=True, entry=result.entry)
            started = True
            return Settlement.ACK
        finally:
            if not started:
                await self.capacity.release()

    async def _get(self, delivery: Delivery) -> Settlement:
        query: GetJob = decode(delivery, GetJob, self.settings.max_message_bytes)
        query = self.workspaces.scope(query, delivery.user_id)
        job = await self._retry_store(lambda: self.intake.get(query))
        log.info("job.found", job_id=job.id, workspace_id=job.workspace_id)
        if delivery.reply_to:
            await self._reply_now(
                delivery, JOB_FOUND, job.model_dump_json().encode(), job_id=job.id
            )
        return Settlement.ACK

    async def _answer_duplicate(
        self, duplicate: Duplicate, command: CreateJob, delivery: Delivery
    ) -> None:
        """Register the duplicate's reply on the job, unless its caller has one already.

        A redelivery carries the same ``reply_to`` and ``correlation_id`` as the first
        delivery, so it finds its reply registered and gets no second one. A new
        caller's reply goes through the outbox like any other: at once when the job
        is finished (or ``wait`` is 0), at completion or deadline otherwise.
        """
        if delivery.reply_to is None:
            return
        now = utc_now()
        reply = new_reply(delivery.reply_to, delivery.correlation_id, command.wait, now)
        claimed: list[str] = []

        def register(record: JobRecord) -> None:
            claimed.clear()
            if any(
                item.kind == "reply"
                and item.reply_to == reply.reply_to
                and item.correlation_id == reply.correlation_id
                for item in record.outbox
            ):
                return
            item = reply.model_copy()
            if record.completed_at is not None:
                item.state = "sending"
                item.claimed_at = now
                item.message_type = JOB_COMPLETED
            record.outbox.append(item)
            if item.state == "sending":
                claimed.append(item.id)
            record.refresh_outbox_due(self.settings.outbox_retry_s)

        handle = JobHandle(self.store, duplicate.job)
        await self._retry_store(lambda: handle.write(register))
        if claimed:
            await self.outbox.deliver(handle, claimed)
        elif reply.deadline is not None and handle.record.completed_at is None:
            self._schedule_deadline(handle.job_id, reply.id, reply.deadline.timestamp())

    async def _reply_now(
        self, delivery: Delivery, reply_type: str, body: bytes, *, job_id: str | None
    ) -> None:
        assert delivery.reply_to is not None
        headers: dict[str, str | int] = {"x-status": REPLY_STATUS[reply_type]}
        if job_id:
            headers["x-job-id"] = job_id
        message = Outgoing(
            delivery.reply_to,
            reply_type,
            body,
            str(uuid6.uuid7()),
            delivery.correlation_id,
            headers,
        )
        if not await self.publisher.publish_reply(message):
            self.metrics.replies_undeliverable.inc()
            log.warning(
                "reply.undeliverable",
                job_id=job_id,
                reply_to=delivery.reply_to,
                correlation_id=delivery.correlation_id,
                reply_type=reply_type,
            )

    async def _reject(self, delivery: Delivery, exc: RejectedError) -> Settlement:
        self.metrics.commands_rejected.labels(exc.key, str(exc.status)).inc()
        log.info(
            "command.rejected",
            status=exc.status,
            key=exc.key,
            reason=exc.message,
            job_id=exc.job_id,
            delivery_count=delivery.delivery_count,
        )
        body = error_body(exc)
        headers: dict[str, str | int] = {"x-status": exc.status}
        if exc.job_id:
            headers["x-job-id"] = exc.job_id
        publishes: list[Awaitable[Any]] = [
            self.publisher.publish_event(
                Outgoing(JOB_REJECTED, JOB_REJECTED, body, str(uuid6.uuid7()), headers=headers)
            ),
            self.publisher.publish_dead_letter(delivery, reason=exc.message, status=exc.status),
        ]
        if delivery.reply_to:
            publishes.append(
                self.publisher.publish_reply(
                    Outgoing(
                        delivery.reply_to,
                        JOB_REJECTED,
                        body,
                        str(uuid6.uuid7()),
                        delivery.correlation_id,
                        headers,
                    )
                )
            )
        await asyncio.gather(*publishes)
        return Settlement.ACK

    async def _crashed(self, delivery: Delivery, exc: Exception) -> Settlement:
        """Handle a command that raised unexpectedly: requeue it, or give up on it."""
        last_try = delivery.delivery_count + 1 >= self.settings.delivery_limit
        log.exception(
            "command.crashed",
            delivery_count=delivery.delivery_count,
            delivery_limit=self.settings.delivery_limit,
            gives_up=last_try,
        )
        if not last_try:
            return Settlement.REQUEUE
        rejection = Unprocessable(
            f"the command failed {delivery.delivery_count + 1} times and was dead-lettered; "
            f"last error: {type(exc).__name__}: {exc}"
        )
        return await self._reject(delivery, rejection)

    async def _retry_store(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run a store operation until it succeeds, backing off up to 5 s between tries.

        The message stays unacknowledged meanwhile, so nothing is lost; when the
        worker is stopping, StoreUnavailable is raised and the message is requeued.
        """
        delay = 0.1
        attempt = 0
        while True:
            try:
                return await operation()
            except StoreUnavailable as exc:
                attempt += 1
                if self._stopping.is_set():
                    raise
                log.warning("store.unavailable", error=str(exc), attempt=attempt, delay_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

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
                handle = await claim(
                    self.store, record, owner=self.owner, lease_s=self.settings.lease_s
                )
                workflow = await self._workflow(record) if handle else None
                if handle is None or workflow is None:
                    await self.capacity.release()
                    continue
                self._start(handle, workflow.workflow, accepted=False)
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

    async def drain(self, grace_s: float) -> int:
        """Wait up to ``grace_s`` for running jobs, then cancel and release the rest.

        Returns how many jobs were cancelled.
        """
        tasks = [task for _, task in self.running.values()]
        if tasks:
            log.info("worker.draining", running=len(tasks), grace_s=grace_s)
            await asyncio.wait(tasks, timeout=grace_s)
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


__all__ = ["JOB_PENDING", "Capacity", "Engine", "Settlement"]
