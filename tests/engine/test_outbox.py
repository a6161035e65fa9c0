"""Replies and events go through the job's outbox and are recorded there."""

from __future__ import annotations

import json
from datetime import timedelta

import aio_pika
import pytest
import uuid6
from aio_pika.abc import AbstractRobustConnection
from structlog.testing import capture_logs

from contracts import Status, utc_now
from tests.conftest import Captured, RawCommands, RunningWorker, WorkerFactory, reply_status
from tests.engine.helpers import (
    listen_on_new_queue,
    poll_job,
    registry_with_test_actions,
    result_step,
    submit,
)
from tests.factories import job_record, new_id
from worker.models import JobRecord, OutboxItem
from worker.settings import Settings

COMMAND = {"workflow_id": "outbox", "meta": {"origin": "test"}}


@pytest.fixture
async def worker(start_worker: WorkerFactory, settings: Settings) -> RunningWorker:
    running = await start_worker(settings, registry=registry_with_test_actions())
    await running.put_workflow({"id": "outbox", "steps": [result_step("a")]})
    return running


def raw_body(command: dict[str, object]) -> bytes:
    return json.dumps(command).encode()


def all_settled(job: JobRecord) -> bool:
    return bool(job.outbox) and all(item.state in ("sent", "undeliverable") for item in job.outbox)


async def test_outbox_items_marked_sent(worker: RunningWorker, raw: RawCommands) -> None:
    job_id = new_id()

    reply, _ = await submit(raw, {"id": job_id, **COMMAND})
    stored = await poll_job(worker.store, job_id, all_settled)

    assert [item.state for item in stored.outbox] == ["sent", "sent", "sent"]
    events = [item.message_type for item in stored.outbox if item.kind == "event"]
    assert sorted(events) == ["job.accepted", "job.completed"]
    replies = [item for item in stored.outbox if item.kind == "reply"]
    assert len(replies) == 1
    assert replies[0].message_type == "job.completed"
    assert replies[0].correlation_id == reply.correlation_id
    assert replies[0].id == reply.message_id
    assert all(item.sent_at is not None for item in stored.outbox)
    assert stored.outbox_due_at is None


async def test_reply_to_missing_queue_undeliverable(
    worker: RunningWorker, amqp: AbstractRobustConnection, events: Captured
) -> None:
    job_id = new_id()
    missing_queue = f"gone-{uuid6.uuid7().hex}"
    channel = await amqp.channel()
    commands = await channel.get_exchange(f"{worker.settings.amqp_namespace}.commands")

    with capture_logs() as logs:
        await commands.publish(
            aio_pika.Message(
                raw_body({"id": job_id, **COMMAND}),
                content_type="application/json",
                reply_to=missing_queue,
                correlation_id="lost-caller",
            ),
            "job.create",
        )
        stored = await poll_job(worker.store, job_id, all_settled)

    replies = [item for item in stored.outbox if item.kind == "reply"]
    assert [item.state for item in replies] == ["undeliverable"]
    assert replies[0].error is not None
    assert missing_queue in replies[0].error
    assert stored.completed_at is not None
    undeliverable = [log for log in logs if log["event"] == "reply.undeliverable"]
    assert [log["job_id"] for log in undeliverable] == [job_id]
    assert undeliverable[0]["reply_to"] == missing_queue
    await events.wait_for(lambda m: m.type == "job.completed" and m.headers["x-job-id"] == job_id)


async def test_undeliverable_reply_blocks_nothing(
    worker: RunningWorker, raw: RawCommands, amqp: AbstractRobustConnection
) -> None:
    channel = await amqp.channel()
    commands = await channel.get_exchange(f"{worker.settings.amqp_namespace}.commands")
    lost_ids = [new_id() for _ in range(3)]
    for job_id in lost_ids:
        await commands.publish(
            aio_pika.Message(
                raw_body({"id": job_id, **COMMAND}),
                content_type="application/json",
                reply_to=f"gone-{uuid6.uuid7().hex}",
            ),
            "job.create",
        )

    reply, job = await submit(raw, COMMAND)

    assert reply.type == "job.completed"
    assert reply_status(reply) == 200
    assert job.status is Status.OK
    for job_id in lost_ids:
        lost = await poll_job(worker.store, job_id, all_settled)
        assert lost.completed_at is not None


async def test_stuck_sending_items_republished(
    worker: RunningWorker, amqp: AbstractRobustConnection, events: Captured
) -> None:
    queue_name, replies = await listen_on_new_queue(amqp)
    long_ago = utc_now() - timedelta(minutes=5)
    reply_item = OutboxItem(
        id=str(uuid6.uuid7()),
        kind="reply",
        state="sending",
        reply_to=queue_name,
        correlation_id="stuck-caller",
        message_type="job.completed",
        created_at=long_ago,
        claimed_at=long_ago,
    )
    event_item = OutboxItem(
        id=str(uuid6.uuid7()),
        kind="event",
        state="sending",
        message_type="job.completed",
        created_at=long_ago,
        claimed_at=long_ago,
    )
    record = job_record(
        created_at=long_ago,
        due_in_s=None,
        workflow_id="outbox",
        status=Status.OK,
        completed_at=long_ago,
        outbox=[reply_item, event_item],
        outbox_due_at=long_ago,
    )
    inserted = await worker.store.insert_job(record, key_taken_since=long_ago)
    assert inserted.status == "created"

    reply = await replies.wait_for(lambda m: m.correlation_id == "stuck-caller")
    event = await events.wait_for(lambda m: m.headers.get("x-job-id") == record.id)
    stored = await poll_job(worker.store, record.id, all_settled)

    assert reply.message_id == reply_item.id
    assert reply.type == "job.completed"
    assert reply_status(reply) == 200
    assert event.message_id == event_item.id
    assert event.type == "job.completed"
    assert [item.state for item in stored.outbox] == ["sent", "sent"]
    assert len(replies.messages) == 1
