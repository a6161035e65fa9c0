"""Failures around the job: the store or the broker failing while the engine works."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from contracts.timestamps import utc_now
from tests.conftest import Captured, RawCommands, RunningWorker, reply_json
from tests.factories import job_record, new_id
from worker.engine.handle import JobHandle
from worker.engine.messages import Delivery, Outgoing
from worker.engine.outbox import Outbox
from worker.errors import StoreUnavailable, TransientError
from worker.models import OutboxItem

WORKFLOW = {"id": "state", "steps": [{"action": "silo.state", "config": {"state": "sent"}}]}


async def test_failed_claim_returns_its_slot(
    worker: RunningWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = worker.worker.engine
    assert engine is not None
    record = await worker.put_workflow(WORKFLOW)
    job = job_record(workflow_id="state", workflow_version=record.version, meta={"a": "1"})
    job.due_at = utc_now() - timedelta(seconds=1)
    await worker.store.insert_job(job, key_taken_since=utc_now())

    async def failing_replace(*args: Any, **kwargs: Any) -> bool:
        raise StoreUnavailable("SQLite: database is locked")

    monkeypatch.setattr(worker.store, "replace_job", failing_replace)
    free_before = engine.capacity.free
    for _ in range(engine.capacity.size + 2):
        with pytest.raises(StoreUnavailable):
            await engine.sweep_once()

    assert engine.capacity.free == free_before


async def test_rejection_requeued_when_dead_letter_fails(
    worker: RunningWorker, raw: RawCommands, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = worker.worker.engine
    assert engine is not None
    publisher = engine.publisher
    original = publisher.publish_dead_letter
    failures = [TransientError("the broker did not confirm within 5 s")]

    async def flaky_dead_letter(delivery: Delivery, *, reason: str, status: int) -> None:
        if failures:
            raise failures.pop()
        await original(delivery, reason=reason, status=status)

    monkeypatch.setattr(publisher, "publish_dead_letter", flaky_dead_letter)

    reply = await raw.send(b"not json")

    assert reply.type == "job.rejected"
    assert failures == []
    assert reply.headers["x-status"] == 400


async def test_rejection_survives_failed_event(
    worker: RunningWorker,
    raw: RawCommands,
    dead_letters: Captured,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = worker.worker.engine
    assert engine is not None

    async def full_listener_queue(message: Outgoing) -> None:
        raise TransientError("the broker refused the event: a listener's queue is full")

    monkeypatch.setattr(engine.publisher, "publish_event", full_listener_queue)

    correlation_id = await raw.publish(b"not json")
    reply = await raw.reply(correlation_id)
    dead = await dead_letters.wait_for(lambda m: m.correlation_id == correlation_id)

    assert reply_json(reply)["key"] == "invalid_json"
    assert dead.headers["x-reject-status"] == 400


async def test_redelivered_rejection_keeps_message_id(raw: RawCommands) -> None:
    # The same command twice, as a redelivery brings it: both replies share one id.
    message_id = new_id()
    first = await raw.send(b"not json", message_id=message_id, correlation_id="c-1")
    second = await raw.send(b"not json", message_id=message_id, correlation_id="c-1")

    assert first.type == "job.rejected"
    assert first.message_id == second.message_id


class RecordingPublisher:
    """The publisher boundary, recording what the outbox hands it."""

    def __init__(self) -> None:
        self.replies: list[Outgoing] = []

    async def publish_reply(self, message: Outgoing) -> bool:
        self.replies.append(message)
        return True

    async def publish_event(self, message: Outgoing) -> None:
        return None

    async def publish_dead_letter(self, delivery: Delivery, *, reason: str, status: int) -> None:
        return None


async def test_late_pending_reply_sent_as_result(worker: RunningWorker) -> None:
    # A job.pending reply whose first publish failed is published again after the job
    # finished: it goes out as job.completed, never as a pending reply of a finished job.
    now = utc_now()
    item = OutboxItem(
        id=new_id(),
        kind="reply",
        state="sending",
        reply_to="caller",
        correlation_id="c-1",
        message_type="job.pending",
        created_at=now,
        claimed_at=now,
    )
    job = job_record(completed_at=now, due_in_s=None, outbox=[item])
    await worker.store.insert_job(job, key_taken_since=now)
    publisher = RecordingPublisher()

    await Outbox(publisher, retry_after_s=1.0).deliver(JobHandle(worker.store, job), [item.id])

    (sent,) = publisher.replies
    assert sent.type == "job.completed"
    assert sent.headers["x-status"] == 200
    assert sent.message_id == item.id
