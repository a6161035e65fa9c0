"""Handling one command: decode, check, create or find the job, reply or reject.

This is where a delivery's fate is decided: every path ends in a ``Settlement`` that
the consumer applies, acknowledging only once the outcome is durable (a stored job, a
published rejection).
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import Any, TypeVar

import structlog
import uuid6
from structlog.contextvars import bound_contextvars

from contracts import CREATE_JOB, GET_JOB, CreateJob, GetJob, Workflow
from contracts.timestamps import utc_now
from worker.engine.capacity import Capacity
from worker.engine.handle import JobHandle
from worker.engine.intake import Duplicate, Intake, decode, error_body
from worker.engine.messages import (
    JOB_COMPLETED,
    JOB_FOUND,
    JOB_REJECTED,
    REPLY_STATUS,
    Delivery,
    Outgoing,
    Publisher,
)
from worker.engine.outbox import Outbox, new_reply
from worker.engine.tenancy import WorkspaceUsers
from worker.errors import (
    InvalidCommand,
    RejectedError,
    StoreUnavailable,
    TransientError,
    Unprocessable,
)
from worker.metrics import Metrics
from worker.models import EntryRecord, JobRecord
from worker.settings import Settings
from worker.store.base import Store

log = structlog.get_logger("worker.engine")

T = TypeVar("T")

#: Starts a stored job that this worker owns: handle, workflow, entry.
StartJob = Callable[[JobHandle, Workflow, EntryRecord | None], None]
#: Schedules a ``job.pending`` reply: job id, outbox item id, deadline (epoch seconds).
ScheduleDeadline = Callable[[str, str, float], None]


class Settlement(Enum):
    """Settlement of a delivery once the engine is done with it."""

    ACK = "ack"
    REQUEUE = "requeue"


def command_message_id(delivery: Delivery, purpose: str) -> str:
    """Return the message id of a reply or event about a command that has no job.

    Every delivery of the same command gets the same id, so a caller can drop the copy a
    redelivery produces. A command with neither a message id nor a correlation id
    cannot be distinguished from a new one and gets a fresh id.
    """
    if delivery.message_id is None and delivery.correlation_id is None:
        return str(uuid6.uuid7())
    seed = "/".join(
        (
            "transform-worker",
            purpose,
            delivery.routing_key,
            delivery.message_id or "",
            delivery.correlation_id or "",
            hashlib.sha256(delivery.body).hexdigest(),
        )
    )
    return str(uuid.uuid5(uuid.NAMESPACE_URL, seed))


class Commands:
    """Handles the commands of one worker process."""

    def __init__(
        self,
        store: Store,
        publisher: Publisher,
        outbox: Outbox,
        settings: Settings,
        metrics: Metrics,
        capacity: Capacity,
        *,
        owner: str,
        start_job: StartJob,
        schedule_deadline: ScheduleDeadline,
        stopping: asyncio.Event,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.outbox = outbox
        self.settings = settings
        self.metrics = metrics
        self.capacity = capacity
        self.intake = Intake(store, settings, owner=owner)
        self.workspaces = WorkspaceUsers(settings.workspace_user_map)
        self._start_job = start_job
        self._schedule_deadline = schedule_deadline
        self._stopping = stopping

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
                return await self._settle_rejection(delivery, exc)
            except (StoreUnavailable, TransientError) as exc:
                # Only reached while stopping: the message goes back for another worker.
                log.warning("command.requeued", error=str(exc))
                return Settlement.REQUEUE
            except Exception as exc:
                return await self._crashed(delivery, exc)

    async def _settle_rejection(self, delivery: Delivery, exc: RejectedError) -> Settlement:
        """Reject a command; requeue it when the rejection itself cannot be published."""
        try:
            return await self._reject(delivery, exc)
        except TransientError as error:
            # The reply or the dead letter did not reach the broker: the command goes
            # back to the queue and is rejected again on its next delivery.
            log.warning("command.requeued", error=str(error))
            return Settlement.REQUEUE

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
            self._start_job(result.handle, result.workflow.workflow, result.entry)
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
            command_message_id(delivery, "reply"),
            delivery.correlation_id,
            headers,
        )
        await self._send_reply(message, job_id=job_id)

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
        event = Outgoing(
            JOB_REJECTED, JOB_REJECTED, body, command_message_id(delivery, "event"), headers=headers
        )
        publishes: list[Awaitable[Any]] = [
            self._publish_event_if_possible(event),
            self.publisher.publish_dead_letter(delivery, reason=exc.message, status=exc.status),
        ]
        if delivery.reply_to:
            reply = Outgoing(
                delivery.reply_to,
                JOB_REJECTED,
                body,
                command_message_id(delivery, "reply"),
                delivery.correlation_id,
                headers,
            )
            publishes.append(self._send_reply(reply, job_id=exc.job_id))
        await asyncio.gather(*publishes)
        return Settlement.ACK

    async def _publish_event_if_possible(self, event: Outgoing) -> None:
        """Publish a rejection event; a failure is logged but does not hold the command.

        A rejected command leaves no job whose outbox could keep the event for later, and
        a listener's full queue must not keep the caller from its reply.
        """
        try:
            await self.publisher.publish_event(event)
        except TransientError as exc:
            log.warning("event.publish_failed", event_type=event.type, error=str(exc))

    async def _send_reply(self, message: Outgoing, *, job_id: str | None) -> None:
        """Publish a reply that is not on a job's outbox; log and count it if returned."""
        if await self.publisher.publish_reply(message):
            return
        self.metrics.replies_undeliverable.inc()
        log.warning(
            "reply.undeliverable",
            job_id=job_id,
            reply_to=message.routing_key,
            correlation_id=message.correlation_id,
            reply_type=message.type,
        )

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
        return await self._settle_rejection(delivery, rejection)

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
