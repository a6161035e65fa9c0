"""When a create-job command makes a new job, repeats one, or conflicts with one."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest

from contracts import Status
from contracts.client import JobRejected, JobsClient
from contracts.timestamps import utc_now
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
from tests.factories import entry_record, job_record, load_envelope, new_id
from worker.gobl.c14n import digest
from worker.gobl.envelope import ENVELOPE_SCHEMA
from worker.settings import Settings
from worker.store.base import InsertStatus

#: A workspace whose name must not appear in replies or events about another workspace.
OTHER_WORKSPACE = f"hidden-{uuid.uuid4().hex[:12]}"

STATE_WORKFLOW: dict[str, Any] = {
    "id": "state",
    "steps": [{"id": "processing", "action": "silo.state", "config": {"state": "processing"}}],
}
SLOW_WORKFLOW: dict[str, Any] = {
    "id": "slow",
    "steps": [{"id": "nap", "action": "test.nap", "config": {"seconds": 1.0}}],
}


@pytest.fixture
async def worker(start_worker: WorkerFactory, settings: Settings) -> RunningWorker:
    running = await start_nap_worker(start_worker, settings)
    await running.put_workflow(STATE_WORKFLOW)
    await running.put_workflow(SLOW_WORKFLOW)
    await running.put_workflow({**STATE_WORKFLOW, "workspace_id": OTHER_WORKSPACE})
    return running


def bare_document(name: str = "us-invoice-us-us.json") -> dict[str, Any]:
    """A GOBL document without its envelope."""
    document: dict[str, Any] = load_envelope(name)["doc"]
    return document


async def test_same_id_same_body_duplicate(
    worker: RunningWorker, raw: RawCommands, events: Captured, client: JobsClient
) -> None:
    job_id = new_id()
    body = {"id": job_id, "workflow_id": "state", "data": load_envelope()}
    first = reply_json(await raw.send(body))

    second_reply = await raw.send(body)

    second = reply_json(second_reply)
    assert second_reply.type == "job.completed"
    assert reply_status(second_reply) == 200
    assert second["id"] == job_id
    assert second["completed_at"] == first["completed_at"]
    assert second["updated_at"] == first["updated_at"]
    assert second["intents"] == first["intents"]
    stored = await worker.store.get_job(job_id)
    assert stored is not None
    assert len(stored.intents) == 1
    assert stored.public().model_dump(mode="json")["updated_at"] == first["updated_at"]
    await flush_events(client, events)
    assert len(job_events(events, job_id, "job.accepted")) == 1
    assert len(job_events(events, job_id, "job.completed")) == 1


async def test_duplicate_with_other_wait(raw: RawCommands) -> None:
    job_id = new_id()
    body = {"id": job_id, "workflow_id": "state", "data": load_envelope()}
    await raw.send(body)

    reply = await raw.send({**body, "wait": 30})

    assert reply.type == "job.completed"
    assert reply_json(reply)["id"] == job_id


async def test_duplicate_compares_normalised_body(raw: RawCommands) -> None:
    job_id = new_id()
    await raw.send({"id": job_id, "workflow_id": "nap", "meta": {"order": "42"}})

    # The same request, spelled with the alias, explicit defaults and an uppercase id
    reply = await raw.send(
        {
            "workspace_id": "default",
            "args": {"order": "42"},
            "tags": [],
            "workflow_id": "nap",
            "id": job_id.upper(),
        }
    )

    assert reply.type == "job.completed"
    assert reply_json(reply)["id"] == job_id


async def test_same_id_other_body_conflict(
    raw: RawCommands, events: Captured, client: JobsClient
) -> None:
    job_id = new_id()
    await raw.send({"id": job_id, "workflow_id": "nap", "meta": {"order": "42"}})

    reply = await raw.send({"id": job_id, "workflow_id": "nap", "meta": {"order": "43"}})

    error = reply_json(reply)
    assert reply.type == "job.rejected"
    assert reply_status(reply) == 409
    assert error["key"] == "conflict"
    assert job_id in error["message"]
    assert error["job_id"] == job_id
    await flush_events(client, events)
    assert len(job_events(events, job_id, "job.accepted")) == 1


async def test_id_of_other_workspace_conflict(
    raw: RawCommands, events: Captured, client: JobsClient
) -> None:
    job_id = new_id()
    body = {"id": job_id, "workflow_id": "state", "data": load_envelope()}
    await raw.send({**body, "workspace_id": OTHER_WORKSPACE})

    reply = await raw.send(body)

    error = reply_json(reply)
    assert reply_status(reply) == 409
    assert error["key"] == "conflict"
    assert job_id in error["message"]
    assert OTHER_WORKSPACE.encode() not in reply.body
    assert OTHER_WORKSPACE not in str(reply.headers)
    rejected = await events.wait_for(lambda m: m.type == "job.rejected")
    assert OTHER_WORKSPACE.encode() not in rejected.body
    await flush_events(client, events)
    assert len(job_events(events, job_id, "job.accepted")) == 1


async def test_duplicate_while_running_gets_own_reply(
    worker: RunningWorker, raw: RawCommands, events: Captured, client: JobsClient
) -> None:
    job_id = new_id()
    body = {"id": job_id, "workflow_id": "slow", "meta": {"order": "42"}}
    first_id = await raw.publish(body)
    await events.wait_for(
        lambda m: m.type == "job.accepted" and (m.headers or {}).get("x-job-id") == job_id
    )

    # When the same command arrives while the first run is still in its step
    second_id = await raw.publish(body)

    first = await raw.reply(first_id)
    second = await raw.reply(second_id)
    assert second.type == "job.completed"
    assert reply_status(second) == 200
    assert reply_json(second)["id"] == job_id
    assert reply_json(second)["completed_at"] is not None
    assert reply_json(second) == reply_json(first)
    await flush_events(client, events)
    await flush_replies(raw)
    assert len(raw.replies_to(first_id)) == 1
    assert len(raw.replies_to(second_id)) == 1
    assert len(job_events(events, job_id, "job.accepted")) == 1
    stored = await worker.store.get_job(job_id)
    assert stored is not None
    assert len(stored.intents) == 1


async def test_key_taken_conflict(client: JobsClient) -> None:
    holder = await client.create_job(
        {"workflow_id": "nap", "key": "order-42", "meta": {"n": "1"}}, wait=10
    )

    with pytest.raises(JobRejected) as exc:
        await client.create_job(
            {"workflow_id": "nap", "key": "order-42", "meta": {"n": "2"}}, wait=10
        )

    assert exc.value.status == 409
    assert exc.value.error.key == "conflict"
    assert exc.value.error.job_id == holder.id
    assert "order-42" in exc.value.error.message


async def test_key_same_body_new_id_conflict(client: JobsClient) -> None:
    # A new id marks a new job even when the body repeats, so the taken key is a conflict.
    command = {"workflow_id": "nap", "key": "order-42", "meta": {"n": "1"}}
    holder = await client.create_job(command, wait=10)

    with pytest.raises(JobRejected) as exc:
        await client.create_job(command, wait=10)

    assert exc.value.status == 409
    assert exc.value.error.job_id == holder.id


async def test_key_in_other_workspace_allowed(client: JobsClient) -> None:
    command = {"workflow_id": "state", "key": "order-42", "data": load_envelope()}
    first = await client.create_job(command, wait=10)

    second = await client.create_job({**command, "workspace_id": OTHER_WORKSPACE}, wait=10)

    assert second.completed_at is not None
    assert second.workspace_id == OTHER_WORKSPACE
    assert second.key == "order-42"
    assert second.id != first.id


async def test_key_redelivery_without_id_duplicate(
    raw: RawCommands, events: Captured, client: JobsClient
) -> None:
    body = {"workflow_id": "state", "key": "order-42", "data": load_envelope()}
    first = reply_json(await raw.send(body))

    reply = await raw.send(body)

    assert reply.type == "job.completed"
    assert reply_status(reply) == 200
    assert reply_json(reply)["id"] == first["id"]
    await flush_events(client, events)
    assert len(job_events(events, first["id"], "job.accepted")) == 1


async def test_key_without_id_other_body_conflict(raw: RawCommands) -> None:
    first = reply_json(await raw.send({"workflow_id": "nap", "key": "k1", "meta": {"n": "1"}}))

    reply = await raw.send({"workflow_id": "nap", "key": "k1", "meta": {"n": "2"}})

    assert reply_status(reply) == 409
    assert reply_json(reply)["job_id"] == first["id"]


async def test_key_held_one_year_conflict(worker: RunningWorker, client: JobsClient) -> None:
    created = utc_now() - timedelta(days=365)
    old = job_record(key="order-42", created_at=created, due_in_s=None, completed_at=created)
    inserted = await worker.store.insert_job(old, key_taken_since=utc_now() - timedelta(days=730))
    assert inserted.status is InsertStatus.CREATED

    with pytest.raises(JobRejected) as exc:
        await client.create_job({"workflow_id": "nap", "key": "order-42", "meta": {}}, wait=10)

    assert exc.value.status == 409
    assert exc.value.error.job_id == old.id


async def test_key_free_after_two_years(worker: RunningWorker, client: JobsClient) -> None:
    created = utc_now() - timedelta(days=3 * 365)
    old = job_record(key="order-42", created_at=created, due_in_s=None, completed_at=created)
    inserted = await worker.store.insert_job(old, key_taken_since=utc_now() - timedelta(days=730))
    assert inserted.status is InsertStatus.CREATED

    job = await client.create_job({"workflow_id": "nap", "key": "order-42", "meta": {}}, wait=10)

    assert job.completed_at is not None
    assert job.id != old.id
    holder = await client.get_job(key="order-42")
    assert holder.id == job.id


async def test_silo_entry_id_wins_over_data(worker: RunningWorker, client: JobsClient) -> None:
    entry = entry_record()
    assert await worker.store.insert_entry(entry) is None

    job = await client.create_job(
        {
            "workflow_id": "state",
            "silo_entry_id": entry.id,
            "data": bare_document(),
            "meta": {"order": "42"},
        },
        wait=10,
    )

    assert job.faults == []
    assert job.silo_entry_id == entry.id
    assert job.envelope is not None
    assert job.envelope["doc"] == entry.envelope["doc"]


async def test_data_wins_over_meta(worker: RunningWorker, client: JobsClient) -> None:
    document = bare_document()

    job = await client.create_job(
        {"workflow_id": "state", "data": document, "meta": {"order": "42"}}, wait=10
    )

    assert job.faults == []
    assert job.silo_entry_id is not None
    assert job.envelope is not None
    assert job.envelope["doc"] == document
    entry = await worker.store.get_entry("default", job.silo_entry_id)
    assert entry is not None
    assert entry.envelope["doc"] == document


async def test_bare_document_wrapped(worker: RunningWorker, client: JobsClient) -> None:
    document = bare_document()

    job = await client.create_job({"workflow_id": "state", "data": document}, wait=10)

    envelope = job.envelope
    assert envelope is not None
    assert envelope["$schema"] == ENVELOPE_SCHEMA
    assert uuid.UUID(envelope["head"]["uuid"]).version == 7
    assert envelope["head"]["dig"] == {"alg": "sha256", "val": digest(document)}
    assert envelope["doc"] == document
    assert job.silo_entry_id is not None
    assert uuid.UUID(job.silo_entry_id).version == 7
    entry = await worker.store.get_entry("default", job.silo_entry_id)
    assert entry is not None
    assert entry.envelope["head"] == envelope["head"]
    assert entry.state == "processing"


async def test_same_envelope_gets_new_entry(worker: RunningWorker, client: JobsClient) -> None:
    # Entries have ids of their own, because real envelopes share head.uuid values.
    envelope = load_envelope()
    first = await client.create_job({"workflow_id": "state", "data": envelope}, wait=10)

    second = await client.create_job({"workflow_id": "state", "data": envelope}, wait=10)

    assert second.faults == []
    assert second.silo_entry_id is not None
    assert second.silo_entry_id != first.silo_entry_id
    assert second.envelope is not None
    assert second.envelope["head"]["uuid"] == envelope["head"]["uuid"]


async def test_same_head_uuid_other_document_accepted(
    worker: RunningWorker, client: JobsClient
) -> None:
    envelope = load_envelope()
    first = await client.create_job({"workflow_id": "state", "data": envelope}, wait=10)
    changed = load_envelope()
    changed["doc"]["code"] = "SAMPLE-002"

    second = await client.create_job({"workflow_id": "state", "data": changed}, wait=10)

    assert second.faults == []
    assert second.silo_entry_id != first.silo_entry_id
    assert second.envelope is not None
    assert second.envelope["head"]["dig"]["val"] == digest(changed["doc"])
    assert first.silo_entry_id is not None
    first_entry = await worker.store.get_entry("default", first.silo_entry_id)
    assert first_entry is not None
    assert first_entry.envelope["doc"]["code"] == "SAMPLE-001"


async def test_meta_only_job_has_no_entry(client: JobsClient) -> None:
    job = await client.create_job({"workflow_id": "nap", "args": {"order": "42"}}, wait=10)

    assert job.completed_at is not None
    assert job.faults == []
    assert job.status is Status.OK
    assert job.silo_entry_id is None
    assert job.envelope is None
    assert job.meta == {"order": "42"}


async def test_message_id_becomes_job_id(
    raw: RawCommands, events: Captured, client: JobsClient
) -> None:
    message_id = new_id()
    body = {"workflow_id": "nap", "meta": {"order": "42"}}
    first = await raw.send(body, message_id=message_id)

    again = await raw.send(body, message_id=message_id)

    assert reply_json(first)["id"] == message_id
    assert again.type == "job.completed"
    assert reply_json(again)["id"] == message_id
    await flush_events(client, events)
    assert len(job_events(events, message_id, "job.accepted")) == 1


@pytest.mark.parametrize(
    "message_id",
    ["order-42", "1b4e28ba-2fa1-41d2-883f-0016d3cca427"],
    ids=["not-uuid", "v4"],
)
async def test_message_id_not_time_based_ignored(raw: RawCommands, message_id: str) -> None:
    reply = await raw.send({"workflow_id": "nap", "meta": {}}, message_id=message_id)

    job_id = reply_json(reply)["id"]
    assert reply.type == "job.completed"
    assert job_id != message_id
    assert uuid.UUID(job_id).version == 7
