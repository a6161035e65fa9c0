"""Poison and malformed commands: neither may crash, stall or loop the consumer.

A command whose handling raises every time is redelivered up to the delivery limit,
then dead-lettered with the error as its reason, and its caller gets one
``job.rejected``. A thousand malformed commands each get exactly one ``job.rejected``
with an error message, none becomes a job, and a valid job still completes after them.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import structlog
import uuid6
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from contracts import CreateJob
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
from worker.engine.intake import Intake
from worker.engine.messages import Delivery

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]

POISON = "poison"
JSON = "application/json"


async def flush(raw: RawCommands, dead_letters: Captured) -> None:
    """Send a ``job.get`` that is rejected, and wait for its reply and its dead letter.

    The worker publishes replies and dead letters on one channel, in order, so every
    reply and dead letter published before these two has arrived once they have.
    """
    correlation_id = await raw.publish({"key": "flush"}, routing_key="job.get")
    await raw.reply(correlation_id, timeout=30)
    await dead_letters.wait_for(lambda m: m.correlation_id == correlation_id, timeout=30)


async def test_poison_command_dead_lettered(
    start_worker: WorkerFactory,
    tmp_path: Path,
    amqp: AbstractRobustConnection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    deliveries: list[int] = []
    create = Intake.create

    async def crash_on_poison(self: Intake, command: CreateJob, delivery: Delivery) -> Any:
        if command.meta and POISON in command.meta:
            deliveries.append(delivery.delivery_count)
            raise RuntimeError("poison pill swallowed")
        return await create(self, command, delivery)

    monkeypatch.setattr(Intake, "create", crash_on_poison)
    settings = fast_settings(tmp_path, delivery_limit=3)
    worker = await start_nap_worker(start_worker, settings)
    namespace = settings.amqp_namespace
    dead_letters = await capture(amqp, f"{namespace}.dead", "")
    raw = RawCommands(await amqp.channel(), namespace)
    await raw.start()

    # When: a command crashes its handling on every delivery.
    correlation_id = await raw.publish({"workflow_id": "nap", "meta": {POISON: "yes"}})
    reply = await raw.reply(correlation_id, timeout=30)
    dead_letter = await dead_letters.wait_for(
        lambda m: m.correlation_id == correlation_id, timeout=30
    )

    # Then: the worker still runs jobs, and the caller got one reply.
    async with JobsClient(AMQP_URL, namespace=namespace, timeout_s=15) as client:
        probe = await run_probe_job(client)
    await flush(raw, dead_letters)
    reason = str((dead_letter.headers or {}).get("x-reject-reason"))
    dead_copies = [m for m in dead_letters.messages if m.correlation_id == correlation_id]
    print(
        f"\npoison: handled on deliveries {deliveries} with delivery_limit "
        f"{settings.delivery_limit}; reply {reply.type} {reply_status(reply)}; "
        f"x-reject-reason {reason!r}"
    )
    assert deliveries == [0, 1, 2]
    assert reply.type == "job.rejected"
    assert reply_status(reply) == 422
    assert "RuntimeError: poison pill swallowed" in reply_json(reply)["message"]
    assert "RuntimeError: poison pill swallowed" in reason
    assert len(raw.replies_to(correlation_id)) == 1
    assert len(dead_copies) == 1
    assert probe.completed_at is not None
    assert worker.task.done() is False


# Fuzzing: a thousand malformed commands, in twenty batches of fifty.
#
# Hypothesis draws each batch as one example, so the worker handles fifty commands at a
# time instead of one round trip per command. Shrinking is off because every shrink
# step would be another round trip, so a failure names the offending commands instead.

BATCHES = 20
BATCH_SIZE = 50
MAX_MESSAGE_BYTES = 64 * 1024
#: The body every "one wrong field" command starts from; on its own it is valid.
BASE = {"workflow_id": "nap", "meta": {"probe": "fuzz"}}
FIELD_NAMES = set(CreateJob.model_fields) | {"args"}


@dataclass(frozen=True)
class Malformed:
    """One command that must be rejected, and the way it is published."""

    kind: str
    body: bytes
    content_type: str | None = JSON
    content_encoding: str | None = None
    routing_key: str = "job.create"
    #: Publish straight to the work queue, so that the routing key is the queue's name.
    to_queue: bool = False

    def describe(self) -> str:
        return f"{self.kind}: {self.body[:120]!r} ({self.content_type}, {self.routing_key})"


def encode(value: Any) -> bytes:
    return json.dumps(value).encode()


def one_field(name: str, values: st.SearchStrategy[Any]) -> st.SearchStrategy[Malformed]:
    """Commands that are valid but for the value of ``name``."""
    return values.map(lambda value: Malformed(f"bad {name}", encode({**BASE, name: value})))


def nested(depth: int, leaf: str = '"x"') -> str:
    return '{"a":' * depth + leaf + "}" * depth


SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
#: JSON values that are neither a string nor null (null means "absent" for most fields).
NOT_STRING = (
    st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.lists(SCALARS, max_size=3)
    | st.dictionaries(st.text(max_size=5), SCALARS, max_size=3)
)
NOT_OBJECT = SCALARS | st.lists(JSON_VALUES, max_size=4)


def broken_variant(nibble: str) -> str:
    """Return a new UUID v7 whose variant is not RFC 4122's, so that it has no version."""
    text = str(uuid6.uuid7())
    return text[:19] + nibble + text[20:]


BROKEN_VARIANT = st.sampled_from("01234567cdef").map(broken_variant)
BAD_JOB_IDS = st.one_of(
    st.uuids(version=3).map(str),
    st.uuids(version=4).map(str),
    st.uuids(version=5).map(str),
    st.just("00000000-0000-0000-0000-000000000000"),
    st.just("ffffffff-ffff-ffff-ffff-ffffffffffff"),
    BROKEN_VARIANT,
    st.builds(lambda: str(uuid6.uuid7())[:-1]),
    st.builds(lambda: str(uuid6.uuid7()) + "0"),
    st.builds(lambda: str(uuid6.uuid7()).replace("-", "-g", 1)),
    st.text(max_size=40),
    NOT_STRING,
)
BAD_META = st.one_of(
    NOT_STRING.filter(lambda value: not isinstance(value, dict)),
    st.tuples(
        st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
        st.text(max_size=8),
        NOT_STRING | st.none(),
    ).map(lambda parts: {**parts[0], parts[1]: parts[2]}),
)
BAD_TAGS = st.one_of(
    NOT_STRING.filter(lambda value: not isinstance(value, list)),
    st.text(max_size=10),
    st.tuples(
        st.lists(st.text(min_size=1, max_size=10), max_size=3),
        NOT_STRING | st.none() | st.just("") | st.just("t" * 101),
    ).map(lambda parts: [*parts[0], parts[1]]),
    st.integers(51, 80).map(lambda n: [f"tag-{i}" for i in range(n)]),
)
BAD_WAIT = st.one_of(
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=10),
    st.lists(SCALARS, max_size=3),
    st.integers(max_value=-1),
    st.integers(min_value=3601),
)

WRONG_FIELDS = (
    one_field("id", BAD_JOB_IDS),
    one_field("workspace_id", st.none() | NOT_STRING | st.text().filter(lambda s: s != "default")),
    one_field("workflow_id", st.none() | NOT_STRING | st.text().filter(lambda s: s != "nap")),
    one_field("silo_entry_id", NOT_STRING | st.text(max_size=40) | st.uuids().map(str)),
    one_field(
        "data",
        NOT_OBJECT.filter(lambda value: value is not None)
        | st.dictionaries(
            st.text(max_size=8).filter(lambda key: not key.startswith("$")), JSON_VALUES, max_size=5
        ),
    ),
    one_field("meta", BAD_META),
    one_field("args", st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2)),
    one_field("key", NOT_STRING | st.just("")),
    one_field("tags", BAD_TAGS),
    one_field("wait", BAD_WAIT),
    st.tuples(
        st.text(min_size=1, max_size=20).filter(lambda k: k not in FIELD_NAMES), JSON_VALUES
    ).map(lambda pair: Malformed("unknown field", encode({**BASE, pair[0]: pair[1]}))),
    st.just(Malformed("no workflow_id", encode({"meta": {"a": "b"}}))),
    st.just(Malformed("no input", encode({"workflow_id": "nap", "key": "no-input"}))),
)

HUGE = (
    st.integers(MAX_MESSAGE_BYTES + 1, 3 * MAX_MESSAGE_BYTES).map(
        lambda n: Malformed("huge body", encode({**BASE, "meta": {"blob": "x" * n}}))
    ),
    st.integers(256, 20_000).map(lambda n: Malformed("huge key", encode({**BASE, "key": "k" * n}))),
    st.integers(129, 5_000).map(
        lambda n: Malformed("huge workflow_id", encode({**BASE, "workflow_id": "w" * n}))
    ),
    st.integers(65, 5_000).map(
        lambda n: Malformed("huge workspace_id", encode({**BASE, "workspace_id": "s" * n}))
    ),
)

DEEP = (
    st.integers(202, 50_000).map(lambda n: Malformed("deep array", b"[" * n + b"]" * n)),
    st.integers(2, 300).map(
        lambda n: Malformed("deep meta", f'{{"workflow_id": "nap", "meta": {nested(n)}}}'.encode())
    ),
    st.integers(2, 300).map(
        lambda n: Malformed("deep data", f'{{"workflow_id": "nap", "data": {nested(n)}}}'.encode())
    ),
)

INVALID_BYTES = st.sampled_from(
    [b"\xff", b"\xfe", b"\x80", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf"]
)
NOT_UTF8 = (
    st.tuples(st.text(max_size=10), INVALID_BYTES).map(
        lambda parts: Malformed(
            "invalid utf-8 in a string",
            b'{"workflow_id": "nap", "meta": {"a": "' + parts[0].encode() + parts[1] + b'"}}',
        )
    ),
    st.binary(min_size=1, max_size=64)
    .filter(lambda data: not _is_utf8(data))
    .map(lambda data: Malformed("random bytes", data)),
    st.just(
        Malformed("lone surrogate escape", b'{"workflow_id": "nap", "meta": {"a": "\\ud800"}}')
    ),
)

WRONG_MEDIA = (
    st.one_of(
        st.none(),
        st.sampled_from(["text/plain", "application/xml", "application/octet-stream", "json"]),
        st.text(max_size=30).filter(lambda t: t.split(";")[0].strip().lower() != JSON),
    ).map(lambda media: Malformed("wrong content type", encode(BASE), content_type=media)),
    st.sampled_from(["gzip", "deflate", "br", "base64"]).map(
        lambda coding: Malformed("wrong encoding", encode(BASE), content_encoding=coding)
    ),
    st.just(Malformed("unknown routing key", encode(BASE), to_queue=True)),
)

BAD_GETS = st.one_of(
    st.sampled_from(
        [
            {},
            {"id": str(uuid6.uuid7()), "key": "both"},
            {"id": "not-a-uuid"},
            {"key": ""},
            {"workspace_id": 5, "key": "k"},
            {"key": "k", "extra": 1},
        ]
    ).map(encode),
    NOT_OBJECT.map(encode),
).map(lambda body: Malformed("bad job.get", body, routing_key="job.get"))

#: Every kind of malformed command. Hypothesis's one_of favours its first branches, so a
#: kind is picked with sampled_from first and then drawn.
KINDS: list[st.SearchStrategy[Malformed]] = [
    *WRONG_FIELDS,
    *HUGE,
    *DEEP,
    *NOT_UTF8,
    *WRONG_MEDIA,
    BAD_GETS,
    NOT_OBJECT.map(lambda value: Malformed("not an object", encode(value))),
]
MALFORMED = st.sampled_from(KINDS).flatmap(lambda kind: kind)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@dataclass
class Tally:
    """What the fuzz test sent and got back, over every batch."""

    kinds: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    batches: int = 0


class FuzzClient:
    """Publishes malformed commands in bulk and collects their replies."""

    def __init__(self, channel: AbstractChannel, namespace: str) -> None:
        self.channel = channel
        self.namespace = namespace
        self.replies: dict[str, list[AbstractIncomingMessage]] = {}
        self.arrived = asyncio.Event()
        self.reply_queue = ""

    async def start(self) -> None:
        queue = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        self.reply_queue = queue.name
        await queue.consume(self._on_reply, no_ack=True)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        self.replies.setdefault(message.correlation_id or "", []).append(message)
        self.arrived.set()

    async def publish(self, command: Malformed, correlation_id: str) -> None:
        message = aio_pika.Message(
            command.body,
            content_type=command.content_type,
            content_encoding=command.content_encoding,
            correlation_id=correlation_id,
            reply_to=self.reply_queue,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        if command.to_queue:
            await self.channel.default_exchange.publish(message, f"{self.namespace}.jobs")
            return
        exchange = await self.channel.get_exchange(f"{self.namespace}.commands", ensure=False)
        await exchange.publish(message, command.routing_key)

    async def wait_for_replies(self, correlation_ids: set[str], timeout: float) -> None:
        async def watch() -> None:
            while not correlation_ids <= set(self.replies):
                self.arrived.clear()
                await self.arrived.wait()

        # A timeout leaves the missing replies for the assertions to name.
        try:
            await asyncio.wait_for(watch(), timeout)
        except TimeoutError:
            return


@dataclass
class FuzzTarget:
    worker: RunningWorker
    client: FuzzClient
    jobs: JobsClient
    events: Captured
    tally: Tally
    #: Ids of the valid jobs run after each batch, the only jobs that may exist.
    probe_ids: set[str] = field(default_factory=set)


@pytest.fixture
async def fuzz_target(
    start_worker: WorkerFactory, tmp_path: Path, amqp: AbstractRobustConnection
) -> AsyncIterator[FuzzTarget]:
    settings = fast_settings(tmp_path, max_message_bytes=MAX_MESSAGE_BYTES)
    worker = await start_nap_worker(start_worker, settings)
    events = await capture(amqp, f"{settings.amqp_namespace}.events", "#")
    client = FuzzClient(await amqp.channel(), settings.amqp_namespace)
    await client.start()
    tally = Tally()
    async with JobsClient(AMQP_URL, namespace=settings.amqp_namespace, timeout_s=15) as jobs:
        yield FuzzTarget(worker, client, jobs, events, tally)
    print(
        f"\nfuzz: {sum(tally.kinds.values())} malformed commands in {tally.batches} batches; "
        f"replies by x-status {dict(sorted(tally.statuses.items()))}; "
        f"kinds {dict(tally.kinds.most_common())}"
    )


@settings(
    max_examples=BATCHES,
    phases=[Phase.generate],
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(batch=st.lists(MALFORMED, min_size=BATCH_SIZE, max_size=BATCH_SIZE))
async def test_malformed_commands_rejected(fuzz_target: FuzzTarget, batch: list[Malformed]) -> None:
    client = fuzz_target.client
    sent = {str(uuid6.uuid7()): command for command in batch}

    # When: a batch of malformed commands arrives at once.
    # Context variables carry each log line's correlation_id, so merge them in.
    with structlog.testing.capture_logs([structlog.contextvars.merge_contextvars]) as logs:
        await asyncio.gather(*(client.publish(command, cid) for cid, command in sent.items()))
        await client.wait_for_replies(set(sent), timeout=60)
        # A rejected job.get flushes the reply channel, so any second reply has arrived.
        flush_id = str(uuid6.uuid7())
        await client.publish(
            Malformed("flush", encode({"key": "flush"}), routing_key="job.get"), flush_id
        )
        await client.wait_for_replies({flush_id}, timeout=30)

    # Then: a valid job still completes, and each malformed command got one rejection.
    probe = await run_probe_job(fuzz_target.jobs)
    await fuzz_target.events.wait_for(
        lambda m: m.type == "job.completed" and (m.headers or {}).get("x-job-id") == probe.id
    )
    replies = {cid: client.replies.get(cid, []) for cid in sent}
    without_reply = [sent[cid].describe() for cid, got in replies.items() if not got]
    repeated = [sent[cid].describe() for cid, got in replies.items() if len(got) > 1]
    firsts = {cid: got[0] for cid, got in replies.items() if got}
    not_rejected = [
        f"{sent[cid].describe()} -> {message.type}"
        for cid, message in firsts.items()
        if message.type != "job.rejected"
    ]
    bodies = {cid: _error_body(message) for cid, message in firsts.items()}
    without_message = [
        sent[cid].describe()
        for cid, body in bodies.items()
        if not (isinstance(body, dict) and isinstance(body.get("message"), str) and body["message"])
    ]
    crashed = [
        f"{sent[entry.get('correlation_id', '')].describe()} -> {entry.get('exc_info')}"
        for entry in logs
        if entry.get("event") == "command.crashed" and entry.get("correlation_id") in sent
    ]
    fuzz_target.probe_ids.add(probe.id)
    accepted = [
        (m.headers or {}).get("x-job-id")
        for m in fuzz_target.events.of_type("job.accepted")
        if (m.headers or {}).get("x-job-id") not in fuzz_target.probe_ids
    ]
    fuzz_target.tally.batches += 1
    fuzz_target.tally.kinds.update(command.kind for command in batch)
    fuzz_target.tally.statuses.update(
        status
        for message in firsts.values()
        if isinstance(status := (message.headers or {}).get("x-status"), int)
    )
    assert without_reply == []
    assert repeated == []
    assert not_rejected == []
    assert without_message == []
    assert crashed == []
    assert accepted == []
    assert probe.completed_at is not None


def _error_body(message: AbstractIncomingMessage) -> Any:
    try:
        return json.loads(message.body)
    except ValueError:
        return None
