"""Replies to create-job and get-job commands, and the headers of replies and events.

A command with ``reply_to`` gets exactly one reply: ``job.completed`` when the job
finished before the ``wait`` deadline (or at completion without ``wait``),
``job.pending`` when the deadline came first, ``job.found`` for ``job.get``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from contracts import Job, Status
from contracts.client import JobsClient
from tests.conftest import (
    Captured,
    RawCommands,
    RunningWorker,
    WorkerFactory,
    flush_events,
    flush_replies,
    job_events,
    reply_json,
    reply_status,
    start_nap_worker,
)
from tests.factories import new_id
from worker.settings import Settings

OTHER_WORKSPACE = f"hidden-{uuid.uuid4().hex[:12]}"


def nap_workflow(workflow_id: str, seconds: float, **fields: Any) -> dict[str, Any]:
    return {
        "id": workflow_id,
        "steps": [{"id": "nap", "action": "test.nap", "config": {"seconds": seconds}}],
        **fields,
    }


#: A job of ``brief`` takes half a second, so it is still running just after acceptance.
BRIEF_WORKFLOW = nap_workflow("brief", 0.5)
#: A job of ``slow`` outlasts a one-second ``wait``.
SLOW_WORKFLOW = nap_workflow("slow", 2.0)
#: Needs a silo entry, so a meta-only job of it fails with a fault.
STATE_WORKFLOW = {"id": "state", "steps": [{"action": "silo.state", "config": {"state": "x"}}]}


@pytest.fixture
async def worker(start_worker: WorkerFactory, settings: Settings) -> RunningWorker:
    running = await start_nap_worker(start_worker, settings)
    await running.put_workflow(BRIEF_WORKFLOW)
    await running.put_workflow(SLOW_WORKFLOW)
    await running.put_workflow(STATE_WORKFLOW)
    await running.put_workflow(nap_workflow("nap", 0, workspace_id=OTHER_WORKSPACE))
    return running


def completed_event(job_id: str) -> Any:
    return lambda m: m.type == "job.completed" and (m.headers or {}).get("x-job-id") == job_id


async def test_wait_zero_pending_at_once(
    raw: RawCommands, events: Captured, client: JobsClient
) -> None:
    correlation_id = await raw.publish({"workflow_id": "brief", "meta": {}, "wait": 0})

    reply = await raw.reply(correlation_id)

    job = reply_json(reply)
    assert reply.type == "job.pending"
    assert reply_status(reply) == 202
    assert job["completed_at"] is None
    assert job_events(events, job["id"], "job.completed") == []
    # Then the job completes, and no second reply is sent.
    await events.wait_for(completed_event(job["id"]))
    await flush_events(client, events)
    await flush_replies(raw)
    assert [m.type for m in raw.replies_to(correlation_id)] == ["job.pending"]


async def test_wait_runs_out_pending(
    raw: RawCommands, events: Captured, client: JobsClient
) -> None:
    started = time.monotonic()
    correlation_id = await raw.publish({"workflow_id": "slow", "meta": {}, "wait": 1})

    reply = await raw.reply(correlation_id)

    waited_s = time.monotonic() - started
    job = reply_json(reply)
    assert reply.type == "job.pending"
    assert reply_status(reply) == 202
    assert job["completed_at"] is None
    assert job_events(events, job["id"], "job.completed") == []
    # The deadline is one second, and the bound allows for stored times being rounded to ms.
    assert waited_s >= 0.9
    await events.wait_for(completed_event(job["id"]))
    finished = await client.get_job(id=job["id"])
    assert finished.completed_at is not None
    assert finished.status is Status.OK
    await flush_events(client, events)
    await flush_replies(raw)
    assert [m.type for m in raw.replies_to(correlation_id)] == ["job.pending"]


async def test_fast_job_within_wait_completed(raw: RawCommands) -> None:
    reply = await raw.send({"workflow_id": "nap", "meta": {"order": "42"}, "wait": 10})

    job = Job.model_validate(reply_json(reply))
    assert reply.type == "job.completed"
    assert reply_status(reply) == 200
    assert job.completed_at is not None
    assert job.status is Status.OK
    assert [intent.step_id for intent in job.intents] == ["nap"]
    assert job.meta == {"order": "42"}


async def test_no_wait_reply_at_completion(
    raw: RawCommands, events: Captured, client: JobsClient
) -> None:
    correlation_id = await raw.publish({"workflow_id": "brief", "meta": {}})

    reply = await raw.reply(correlation_id)

    job = reply_json(reply)
    assert reply.type == "job.completed"
    assert reply_status(reply) == 200
    assert job["completed_at"] is not None
    assert job["intents"][0]["completed"] is True
    await flush_events(client, events)
    await flush_replies(raw)
    assert [m.type for m in raw.replies_to(correlation_id)] == ["job.completed"]


async def test_failed_job_reply_carries_faults(raw: RawCommands, events: Captured) -> None:
    reply = await raw.send({"workflow_id": "state", "meta": {}})

    job = reply_json(reply)
    assert reply.type == "job.completed"
    assert reply_status(reply) == 200
    assert job["completed_at"] is not None
    assert [fault["code"] for fault in job["faults"]] == ["no-entry"]
    failed = await events.wait_for(lambda m: m.type == "job.failed")
    assert (failed.headers or {}).get("x-job-id") == job["id"]


async def test_get_by_id_found(raw: RawCommands, client: JobsClient) -> None:
    job = await client.create_job({"workflow_id": "nap", "meta": {}}, wait=10)

    reply = await raw.send({"id": job.id}, routing_key="job.get")

    assert reply.type == "job.found"
    assert reply_status(reply) == 200
    assert Job.model_validate(reply_json(reply)) == job


async def test_get_by_key_found(raw: RawCommands, client: JobsClient) -> None:
    job = await client.create_job({"workflow_id": "nap", "key": "order-42", "meta": {}}, wait=10)

    reply = await raw.send({"key": "order-42"}, routing_key="job.get")

    assert reply.type == "job.found"
    assert reply_status(reply) == 200
    assert Job.model_validate(reply_json(reply)) == job


@pytest.mark.parametrize(
    "query",
    [{"id": "0190a9d4-7b1e-7c3a-9f00-000000000001"}, {"key": "order-404"}],
    ids=["id", "key"],
)
async def test_get_unknown_not_found(raw: RawCommands, query: dict[str, str]) -> None:
    reply = await raw.send(query, routing_key="job.get")

    error = reply_json(reply)
    assert reply.type == "job.rejected"
    assert reply_status(reply) == 404
    assert error["key"] == "not_found"
    assert next(iter(query.values())) in error["message"]


@pytest.mark.parametrize("by", ["id", "key"])
async def test_get_other_workspace_not_found(raw: RawCommands, client: JobsClient, by: str) -> None:
    job = await client.create_job(
        {"workspace_id": OTHER_WORKSPACE, "workflow_id": "nap", "key": "order-42", "meta": {}},
        wait=10,
    )
    query = {"id": job.id} if by == "id" else {"key": "order-42"}

    reply = await raw.send(query, routing_key="job.get")

    assert reply_status(reply) == 404
    assert reply_json(reply)["key"] == "not_found"
    assert OTHER_WORKSPACE.encode() not in reply.body


async def test_get_invalid_query_rejected(raw: RawCommands) -> None:
    reply = await raw.send(
        {"id": "0190a9d4-7b1e-7c3a-9f00-000000000001", "key": "k"}, routing_key="job.get"
    )

    assert reply_status(reply) == 400
    assert reply_json(reply)["key"] == "validation"


async def test_reply_properties(raw: RawCommands, client: JobsClient) -> None:
    job = await client.create_job({"workflow_id": "nap", "meta": {}}, wait=10)
    commands: list[tuple[dict[str, Any], str, str, int]] = [
        ({"workflow_id": "nap", "meta": {}}, "job.create", "job.completed", 200),
        ({"workflow_id": "brief", "meta": {}, "wait": 0}, "job.create", "job.pending", 202),
        ({"workflow_id": "missing", "meta": {}}, "job.create", "job.rejected", 404),
        ({"id": job.id}, "job.get", "job.found", 200),
    ]

    for body, routing_key, reply_type, status in commands:
        correlation_id = await raw.publish(body, routing_key=routing_key)
        reply = await raw.reply(correlation_id)

        assert reply.correlation_id == correlation_id
        assert reply.content_type == "application/json"
        assert reply.type == reply_type
        assert (reply.headers or {}).get("x-status") == status


async def test_events_carry_job_headers(events: Captured, client: JobsClient) -> None:
    job = await client.create_job({"workflow_id": "nap", "meta": {}}, wait=10)

    await events.wait_for(completed_event(job.id))

    assert [m.type for m in events.messages] == ["job.accepted", "job.completed"]
    for event in events.messages:
        headers = event.headers or {}
        assert headers.get("x-job-id") == job.id
        assert headers.get("x-workspace-id") == "default"
        assert headers.get("x-workflow-id") == "nap"
        assert event.content_type == "application/json"


async def test_redelivered_after_completion_one_reply(
    raw: RawCommands, events: Captured, client: JobsClient
) -> None:
    body = {"id": new_id(), "workflow_id": "nap", "meta": {}}
    correlation_id = await raw.publish(body)
    first = await raw.reply(correlation_id)
    assert first.type == "job.completed"

    # When the broker delivers the same message again: same body, same correlation id
    await raw.publish(body, correlation_id=correlation_id)

    await flush_events(client, events)
    await flush_replies(raw)
    assert [m.type for m in raw.replies_to(correlation_id)] == ["job.completed"]


async def test_redelivered_while_running_one_reply(
    raw: RawCommands, events: Captured, client: JobsClient
) -> None:
    job_id = new_id()
    body = {"id": job_id, "workflow_id": "brief", "meta": {}}
    correlation_id = await raw.publish(body)
    await events.wait_for(
        lambda m: m.type == "job.accepted" and (m.headers or {}).get("x-job-id") == job_id
    )

    await raw.publish(body, correlation_id=correlation_id)

    reply = await raw.reply(correlation_id)
    assert reply.type == "job.completed"
    await flush_events(client, events)
    await flush_replies(raw)
    assert [m.type for m in raw.replies_to(correlation_id)] == ["job.completed"]


async def test_redelivered_wait_zero_one_reply(
    raw: RawCommands, events: Captured, client: JobsClient
) -> None:
    body = {"id": new_id(), "workflow_id": "brief", "meta": {}, "wait": 0}
    correlation_id = await raw.publish(body)
    first = await raw.reply(correlation_id)
    assert first.type == "job.pending"

    await raw.publish(body, correlation_id=correlation_id)

    await events.wait_for(completed_event(body["id"]))
    await flush_events(client, events)
    await flush_replies(raw)
    assert [m.type for m in raw.replies_to(correlation_id)] == ["job.pending"]
