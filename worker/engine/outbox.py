"""Replies and events that a job owes, and their delivery.

Every reply and event is first written to the job's outbox, then published, then
marked sent. Each write is compare-and-set, so two workers never both claim one
reply. A worker that dies between publishing and marking leaves the item ``sending``.
The sweeper publishes it again once ``outbox_retry_s`` has passed, with the same
``message_id``, so that listeners that must see each reply once can drop the copy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import datetime, timedelta

import structlog
import uuid6

from contracts import Job
from contracts.timestamps import utc_now
from worker.engine.handle import JobHandle
from worker.engine.messages import JOB_COMPLETED, JOB_PENDING, REPLY_STATUS, Outgoing, Publisher
from worker.errors import TransientError
from worker.metrics import Metrics
from worker.models import JobRecord, OutboxItem

log = structlog.get_logger("worker.outbox")


def new_event(name: str, now: datetime) -> OutboxItem:
    return OutboxItem(
        id=str(uuid6.uuid7()),
        kind="event",
        state="sending",
        message_type=name,
        created_at=now,
        claimed_at=now,
    )


def new_reply(
    reply_to: str, correlation_id: str | None, wait_s: int | None, now: datetime
) -> OutboxItem:
    """Return the outbox item of a command's reply; ``wait: 0`` is claimed at once."""
    item = OutboxItem(
        id=str(uuid6.uuid7()),
        kind="reply",
        reply_to=reply_to,
        correlation_id=correlation_id,
        created_at=now,
        deadline=None if wait_s is None else now + timedelta(seconds=wait_s),
    )
    if wait_s == 0:
        item.state = "sending"
        item.claimed_at = now
        item.message_type = JOB_PENDING
    return item


def claim_completion(job: JobRecord, now: datetime) -> None:
    """Move every reply still waiting to ``sending`` a ``job.completed`` reply."""
    for item in job.outbox:
        if item.kind == "reply" and item.state == "pending":
            item.state = "sending"
            item.claimed_at = now
            item.message_type = JOB_COMPLETED


def job_headers(job: Job) -> dict[str, str | int]:
    return {
        "x-job-id": job.id,
        "x-workspace-id": job.workspace_id,
        "x-workflow-id": job.workflow_id,
    }


class Outbox:
    """Publishes outbox items and records the outcome on the job."""

    def __init__(
        self, publisher: Publisher, *, retry_after_s: float, metrics: Metrics | None = None
    ) -> None:
        self.publisher = publisher
        self.retry_after_s = retry_after_s
        self.metrics = metrics or Metrics()

    async def deliver(
        self, handle: JobHandle, item_ids: Iterable[str], *, defer_mark: bool = False
    ) -> None:
        """Publish the given ``sending`` items of the job, then mark them.

        A publish that fails leaves its item ``sending`` for the sweeper. With
        ``defer_mark`` the marks ride along with the job's next write. The runner uses
        that for ``job.accepted``, because its job is certain to be written again.
        """
        wanted = set(item_ids)
        job = handle.record
        items = [item for item in job.outbox if item.id in wanted and item.state == "sending"]
        if not items:
            return
        body = job.public_json()
        outcomes = await asyncio.gather(
            *(self._publish(job, body, item) for item in items), return_exceptions=True
        )
        results: dict[str, tuple[str, str | None]] = {}
        for item, outcome in zip(items, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, TransientError):
                    raise outcome
                log.warning(
                    "outbox.publish_failed",
                    job_id=job.id,
                    message_type=item.message_type,
                    error=str(outcome),
                )
                continue
            results[item.id] = outcome
        if results and defer_mark:
            handle.defer(lambda record: self._mark(record, results))
        elif results:
            await handle.write(lambda record: self._mark(record, results))

    async def _publish(
        self, public: JobRecord, body: bytes, item: OutboxItem
    ) -> tuple[str, str | None]:
        message_type = item.message_type or JOB_COMPLETED
        if item.kind == "reply" and message_type == JOB_PENDING and public.completed_at:
            # A pending reply that only gets out after the job finished (its first
            # publish failed) goes as the result: a pending reply never shows a finish.
            message_type = JOB_COMPLETED
        headers = job_headers(public)
        if item.kind == "event":
            await self.publisher.publish_event(
                Outgoing(message_type, message_type, body, item.id, headers=headers)
            )
            log.debug("event.published", job_id=public.id, event_type=message_type)
            return "sent", None
        assert item.reply_to is not None
        headers["x-status"] = REPLY_STATUS[message_type]
        delivered = await self.publisher.publish_reply(
            Outgoing(item.reply_to, message_type, body, item.id, item.correlation_id, headers)
        )
        if not delivered:
            self.metrics.replies_undeliverable.inc()
            log.warning(
                "reply.undeliverable",
                job_id=public.id,
                reply_to=item.reply_to,
                correlation_id=item.correlation_id,
                reply_type=message_type,
            )
            return "undeliverable", f"no queue {item.reply_to!r}: the caller is gone"
        log.debug(
            "reply.sent",
            job_id=public.id,
            correlation_id=item.correlation_id,
            reply_type=message_type,
            status=headers["x-status"],
        )
        return "sent", None

    def _mark(self, record: JobRecord, results: dict[str, tuple[str, str | None]]) -> None:
        now = utc_now()
        for item in record.outbox:
            outcome = results.get(item.id)
            if outcome is None or item.state != "sending":
                continue
            state, error = outcome
            item.state = "sent" if state == "sent" else "undeliverable"
            item.sent_at = now
            item.error = error
        record.refresh_outbox_due(self.retry_after_s)

    async def send_deadline_reply(self, handle: JobHandle, item_id: str) -> None:
        """Send ``job.pending`` to a caller whose ``wait`` ran out, unless it has its reply."""
        claimed: list[bool] = []

        def claim(record: JobRecord) -> None:
            claimed.clear()
            for item in record.outbox:
                if item.id == item_id and item.state == "pending" and record.completed_at is None:
                    item.state = "sending"
                    item.claimed_at = utc_now()
                    item.message_type = JOB_PENDING
                    claimed.append(True)
            record.refresh_outbox_due(self.retry_after_s)

        await handle.write(claim)
        if claimed:
            await self.deliver(handle, [item_id])

    async def recover(self, handle: JobHandle) -> None:
        """Publish what a job still owes: due deadlines, and items stuck in ``sending``."""
        now = utc_now()
        stale_before = now - timedelta(seconds=self.retry_after_s)
        overdue = [
            item.id
            for item in handle.record.outbox
            if item.kind == "reply"
            and item.state == "pending"
            and item.deadline is not None
            and item.deadline <= now
        ]
        for item_id in overdue:
            await self.send_deadline_reply(handle, item_id)
        stale = [
            item.id
            for item in handle.record.outbox
            if item.state == "sending" and (item.claimed_at or now) <= stale_before
        ]
        if not stale:
            due = handle.record.outbox_due_at
            if due is not None and due <= now:
                # Nothing is owed after all (another worker delivered it): stop the
                # sweeper from finding this job again.
                await handle.write(lambda job: job.refresh_outbox_due(self.retry_after_s))
            return
        reclaimed: list[str] = []

        def reclaim(job: JobRecord) -> None:
            reclaimed.clear()
            for item in job.outbox:
                if (
                    item.id in stale
                    and item.state == "sending"
                    and (item.claimed_at or now) <= stale_before
                ):
                    item.claimed_at = utc_now()
                    reclaimed.append(item.id)
            job.refresh_outbox_due(self.retry_after_s)

        await handle.write(reclaim)
        if reclaimed:
            log.info("outbox.republishing", job_id=handle.job_id, items=len(reclaimed))
            await self.deliver(handle, reclaimed)
