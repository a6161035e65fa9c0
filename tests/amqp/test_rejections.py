"""Commands the worker cannot accept: one rejection reply, one event, one dead letter.

Every case also runs a valid job afterwards, to show that a bad command neither
crashes nor stalls the consumer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import uuid6
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from contracts.client import JobsClient
from tests.conftest import (
    AMQP_URL,
    Captured,
    RawCommands,
    RunningWorker,
    WorkerFactory,
    capture,
    fast_settings,
    reply_json,
    reply_status,
    run_probe_job,
    start_nap_worker,
)
from tests.factories import load_envelope
from worker.gobl.c14n import digest
from worker.settings import Settings

V4_ID = "1b4e28ba-2fa1-41d2-883f-0016d3cca427"
UNKNOWN_ENTRY = "0190a9d4-7b1e-7c3a-9f00-000000000001"
FAKE_SIGNATURE = "eyJhbGciOiJFUzI1NiJ9.e30.AAAA"

STATE_WORKFLOW = {
    "id": "state",
    "steps": [{"id": "processing", "action": "silo.state", "config": {"state": "processing"}}],
}
DRAFT_WORKFLOW = {
    "id": "unpublished",
    "draft": True,
    "steps": [{"action": "silo.state", "config": {"state": "processing"}}],
}


def tampered_signed_envelope() -> dict[str, Any]:
    """A real envelope with a signature added and its document changed afterwards."""
    envelope = load_envelope()
    envelope["sigs"] = [FAKE_SIGNATURE]
    envelope["doc"]["code"] = "TAMPERED-1"
    return envelope


TAMPERED = tampered_signed_envelope()


@dataclass(frozen=True)
class Case:
    body: bytes | dict[str, Any]
    status: int
    key: str
    #: Parts of the message: what was wrong and what is accepted.
    message_parts: tuple[str, ...]
    publish: dict[str, Any] = field(default_factory=dict)


CASES = {
    "v4-id": Case(
        {"id": V4_ID, "workflow_id": "state", "meta": {"a": "1"}},
        400,
        "validation",
        (V4_ID, "version 4", "version 7 or 1"),
    ),
    "no-input": Case(
        {"workflow_id": "state"}, 400, "validation", ("silo_entry_id", "data", "meta")
    ),
    "unknown-field": Case(
        {"workflow_id": "state", "meta": {"a": "1"}, "colour": "red"},
        400,
        "validation",
        ("colour", "unknown field", "workflow_id"),
    ),
    "unknown-workflow": Case(
        {"workflow_id": "missing", "meta": {"a": "1"}},
        404,
        "not_found",
        ("workflow missing", "workspace default", "workflows put"),
    ),
    "unknown-entry": Case(
        {"workflow_id": "state", "silo_entry_id": UNKNOWN_ENTRY},
        404,
        "not_found",
        (UNKNOWN_ENTRY, "workspace default"),
    ),
    "draft-workflow": Case(
        {"workflow_id": "unpublished", "meta": {"a": "1"}},
        422,
        "validation",
        ("unpublished", "draft", "draft: false"),
    ),
    "signed-digest-mismatch": Case(
        {"workflow_id": "state", "data": TAMPERED},
        422,
        "validation",
        (TAMPERED["head"]["dig"]["val"], digest(TAMPERED["doc"]), "signed"),
    ),
    "not-json": Case(b"workflow_id=state", 400, "invalid_json", ("not valid", "JSON object")),
    "invalid-utf8": Case(
        b'{"workflow_id": "st\xffate", "meta": {}}', 400, "invalid_json", ("UTF-8", "JSON object")
    ),
    "json-array": Case(b'[{"workflow_id": "state"}]', 400, "validation", ("array", "JSON object")),
    "json-string": Case(b'"state"', 400, "validation", ("string", "JSON object")),
    "json-null": Case(b"null", 400, "validation", ("null", "JSON object")),
    "nan": Case(
        b'{"workflow_id": "state", "meta": {}, "wait": NaN}',
        400,
        "invalid_json",
        ("not valid", "JSON object"),
    ),
    "text-plain": Case(
        {"workflow_id": "state", "meta": {"a": "1"}},
        415,
        "unsupported_media_type",
        ("'text/plain'", "application/json"),
        {"content_type": "text/plain"},
    ),
    "no-content-type": Case(
        {"workflow_id": "state", "meta": {"a": "1"}},
        415,
        "unsupported_media_type",
        ("none", "application/json"),
        {"content_type": None},
    ),
    # Values far longer than any header frame: the rejection quotes them only in part.
    "huge-id": Case(
        {"id": "x" * 200_000, "workflow_id": "state", "meta": {}},
        400,
        "validation",
        ("is not a UUID", "…"),
    ),
    "huge-field-name": Case(
        {"workflow_id": "state", "meta": {}, "k" * 200_000: 1},
        400,
        "validation",
        ("unknown field", "workflow_id"),
    ),
    # Numbers that parse but have no canonical JSON form, so no digest.
    "infinite-number": Case(
        b'{"workflow_id": "state", "data": {"$schema": "https://gobl.org/draft-0/bill/invoice",'
        b' "x": 1e400}}',
        422,
        "validation",
        ("canonical JSON", "finite"),
    ),
    "huge-integer": Case(
        b'{"workflow_id": "state", "data": {"$schema": "https://gobl.org/draft-0/bill/invoice",'
        b' "x": ' + b"9" * 400 + b"}}",
        422,
        "validation",
        ("canonical JSON", "integers beyond 64 bits"),
    ),
    "gzip-encoding": Case(
        {"workflow_id": "state", "meta": {"a": "1"}},
        415,
        "unsupported_media_type",
        ("'gzip'", "uncompressed UTF-8 JSON"),
        {"content_encoding": "gzip"},
    ),
}


@pytest.fixture
async def worker(start_worker: WorkerFactory, settings: Settings) -> RunningWorker:
    running = await start_nap_worker(start_worker, settings)
    await running.put_workflow(STATE_WORKFLOW)
    await running.put_workflow(DRAFT_WORKFLOW)
    return running


async def check_rejection(
    reply: AbstractIncomingMessage,
    correlation_id: str,
    case: Case,
    *,
    events: Captured,
    dead_letters: Captured,
    client: JobsClient,
) -> None:
    """Check one rejection end to end: reply, event, dead letter, and a job run after it."""
    error = reply_json(reply)
    assert reply.type == "job.rejected"
    assert reply_status(reply) == case.status
    assert reply.correlation_id == correlation_id
    assert error["key"] == case.key
    for part in case.message_parts:
        assert part in error["message"]

    event = await events.wait_for(lambda m: m.type == "job.rejected")
    assert json.loads(event.body) == error
    assert (event.headers or {}).get("x-status") == case.status

    dead = await dead_letters.wait_for(lambda m: m.correlation_id == correlation_id)
    assert (dead.headers or {}).get("x-reject-reason") == error["message"]
    assert (dead.headers or {}).get("x-reject-status") == case.status
    # Rejected on its first delivery: the command never crashed the handler.
    assert (dead.headers or {}).get("x-delivery-count") == 0
    assert len(error["message"]) <= 1000

    probe = await run_probe_job(client)
    assert probe.completed_at is not None
    assert probe.faults == []
    assert len(dead_letters.messages) == 1
    assert len(events.of_type("job.rejected")) == 1


@pytest.mark.parametrize("name", list(CASES))
async def test_command_rejected(
    name: str,
    raw: RawCommands,
    events: Captured,
    dead_letters: Captured,
    client: JobsClient,
) -> None:
    case = CASES[name]

    correlation_id = await raw.publish(case.body, **case.publish)
    reply = await raw.reply(correlation_id)

    await check_rejection(
        reply, correlation_id, case, events=events, dead_letters=dead_letters, client=client
    )
    assert len(raw.replies_to(correlation_id)) == 1


async def test_json_with_charset_accepted(raw: RawCommands) -> None:
    reply = await raw.send(
        {"workflow_id": "nap", "meta": {}}, content_type="application/json; charset=utf-8"
    )

    assert reply.type == "job.completed"
    assert reply_status(reply) == 200


async def test_dead_letter_keeps_command(raw: RawCommands, dead_letters: Captured) -> None:
    body = b'{"workflow_id": "state"}'

    correlation_id = await raw.publish(body, message_id="order-42")
    await raw.reply(correlation_id)

    dead = await dead_letters.wait_for(lambda m: m.correlation_id == correlation_id)
    assert dead.body == body
    assert dead.message_id == "order-42"
    assert dead.content_type == "application/json"
    assert (dead.headers or {}).get("x-original-routing-key") == "job.create"


async def test_body_over_limit_rejected(
    start_worker: WorkerFactory, tmp_path: Path, amqp: AbstractRobustConnection
) -> None:
    settings = fast_settings(tmp_path, max_message_bytes=2048)
    running = await start_nap_worker(start_worker, settings)
    await running.put_workflow(STATE_WORKFLOW)
    namespace = settings.amqp_namespace
    raw = RawCommands(await amqp.channel(), namespace)
    await raw.start()
    events = await capture(amqp, f"{namespace}.events", "#")
    dead_letters = await capture(amqp, f"{namespace}.dead", "")
    body = json.dumps(
        {"workflow_id": "state", "data": load_envelope("de-invoice-de-rounding.json")}
    ).encode()
    assert len(body) > 2048

    correlation_id = await raw.publish(body)
    reply = await raw.reply(correlation_id)

    case = Case(body, 413, "too_large", (f"{len(body)} bytes", "at most 2048 bytes"))
    async with JobsClient(AMQP_URL, namespace=namespace, timeout_s=15) as client:
        await check_rejection(
            reply, correlation_id, case, events=events, dead_letters=dead_letters, client=client
        )


async def test_unknown_routing_key_rejected(
    worker: RunningWorker,
    amqp: AbstractRobustConnection,
    events: Captured,
    dead_letters: Captured,
    client: JobsClient,
) -> None:
    # The commands exchange drops a routing key that no queue is bound to, so the command
    # goes to the jobs queue through the default exchange, with the queue name as its key.
    channel = await amqp.channel()
    replies = Captured()
    reply_queue = await channel.declare_queue(exclusive=True, auto_delete=True)

    async def on_reply(message: AbstractIncomingMessage) -> None:
        replies.messages.append(message)
        replies.arrived.set()

    await reply_queue.consume(on_reply, no_ack=True)
    jobs_queue = f"{worker.settings.amqp_namespace}.jobs"
    correlation_id = str(uuid6.uuid7())
    message = aio_pika.Message(
        json.dumps({"workflow_id": "state", "meta": {"a": "1"}}).encode(),
        content_type="application/json",
        correlation_id=correlation_id,
        reply_to=reply_queue.name,
    )

    await channel.default_exchange.publish(message, jobs_queue)
    reply = await replies.wait_for(lambda m: m.correlation_id == correlation_id)

    case = Case(b"", 400, "validation", (repr(jobs_queue), "job.create", "job.get"))
    await check_rejection(
        reply, correlation_id, case, events=events, dead_letters=dead_letters, client=client
    )
    assert len(replies.messages) == 1


async def test_rejected_without_reply_to(
    raw: RawCommands, events: Captured, dead_letters: Captured, client: JobsClient
) -> None:
    correlation_id = await raw.publish({"workflow_id": "state"}, reply=False)

    event = await events.wait_for(lambda m: m.type == "job.rejected")
    dead = await dead_letters.wait_for(lambda m: m.correlation_id == correlation_id)
    probe = await run_probe_job(client)

    assert json.loads(event.body)["key"] == "validation"
    assert (dead.headers or {}).get("x-reject-status") == 400
    assert "x-reject-reason" in (dead.headers or {})
    assert probe.completed_at is not None
    assert raw.replies_to(correlation_id) == []
    assert len(dead_letters.messages) == 1
    assert len(events.of_type("job.rejected")) == 1


async def test_unknown_routing_key_on_exchange(raw: RawCommands, dead_letters: Captured) -> None:
    # No binding takes job.delete; the exchange's alternate exchange hands it to the worker.
    reply = await raw.send(
        {"workspace_id": "default", "id": str(uuid6.uuid7())}, routing_key="job.delete"
    )

    assert reply.type == "job.rejected"
    assert reply_status(reply) == 400
    assert "unknown routing key 'job.delete'" in reply_json(reply)["message"]
    dead = await dead_letters.wait_for(
        lambda m: m.headers.get("x-original-routing-key") == "job.delete"
    )
    assert "unknown routing key" in str(dead.headers["x-reject-reason"])
