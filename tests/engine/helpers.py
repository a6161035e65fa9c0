"""Test actions and polling helpers shared by the engine tests.

The actions count their calls per ``(job id, step id)`` in module-level counters, so a
test can tell whether a step ran again after a retry or a restart. Job ids are UUID v7,
so counters of different tests never collide.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from pydantic import BaseModel, ConfigDict

from contracts import Intent, Job, Status
from tests.conftest import Captured, RawCommands, reply_json
from worker.actions.base import ActionResult, ActionSpec, StepContext
from worker.actions.registry import ActionRegistry, builtin_actions
from worker.errors import TransientError
from worker.models import JobRecord
from worker.store.base import Store

#: Calls of each test action, by (job id, step id).
CALLS: Counter[tuple[str, str]] = Counter()
#: ``time.monotonic()`` of each call, by (job id, step id).
CALL_TIMES: defaultdict[tuple[str, str], list[float]] = defaultdict(list)
#: Set when ``test.hold`` starts its first call of a job, by job id.
HOLD_STARTED: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)


def record_call(ctx: StepContext[Any]) -> int:
    """Count one call of the step in its job and return how many calls there were."""
    key = (ctx.job_id, ctx.step_id)
    CALLS[key] += 1
    CALL_TIMES[key].append(time.monotonic())
    return CALLS[key]


def calls(job_id: str, step_id: str) -> int:
    return CALLS[(job_id, step_id)]


class ResultConfig(BaseModel):
    """Config of ``test.result``: the result to return, after ``sleep_s`` seconds."""

    model_config = ConfigDict(extra="forbid")

    status: str = "OK"
    code: str | None = None
    message: str | None = None
    meta: dict[str, str] = {}
    sleep_s: float = 0.0


class FlakyConfig(BaseModel):
    """Config of ``test.flaky``: raise TransientError on the first ``failures`` calls."""

    model_config = ConfigDict(extra="forbid")

    failures: int = 1
    retry_in_s: float | None = None


class QueuedConfig(BaseModel):
    """Config of ``test.queued``: return QUEUED on the first ``polls`` calls."""

    model_config = ConfigDict(extra="forbid")

    polls: int = 1
    retry_in_s: float | None = None


class RewriteConfig(BaseModel):
    """Config of ``test.rewrite``: set one top-level field of the document."""

    model_config = ConfigDict(extra="forbid")

    field: str
    value: str


class AppendConfig(BaseModel):
    """Config of ``test.append``: add the job id to a list field of the document."""

    model_config = ConfigDict(extra="forbid")

    field: str


class EmptyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


async def result_action(ctx: StepContext[ResultConfig]) -> ActionResult:
    record_call(ctx)
    if ctx.config.sleep_s:
        await asyncio.sleep(ctx.config.sleep_s)
    return ActionResult(
        Status(ctx.config.status),
        code=ctx.config.code,
        message=ctx.config.message,
        meta=ctx.config.meta,
    )


async def flaky_action(ctx: StepContext[FlakyConfig]) -> ActionResult:
    count = record_call(ctx)
    if count <= ctx.config.failures:
        raise TransientError(f"call {count} failed", retry_in_s=ctx.config.retry_in_s)
    return ActionResult(Status.OK, message=f"succeeded on call {count}")


async def queued_action(ctx: StepContext[QueuedConfig]) -> ActionResult:
    count = record_call(ctx)
    if count <= ctx.config.polls:
        return ActionResult(Status.QUEUED, code="queued", retry_in_s=ctx.config.retry_in_s)
    return ActionResult(Status.OK, message=f"done on poll {count}")


async def rewrite_action(ctx: StepContext[RewriteConfig]) -> ActionResult:
    record_call(ctx)
    assert ctx.envelope is not None
    document = {**ctx.envelope["doc"], ctx.config.field: ctx.config.value}
    return ActionResult(Status.OK, document=document)


async def append_action(ctx: StepContext[AppendConfig]) -> ActionResult:
    record_call(ctx)
    assert ctx.envelope is not None
    document = dict(ctx.envelope["doc"])
    document[ctx.config.field] = [*document.get(ctx.config.field, []), ctx.job_id]
    # Give other jobs on the same entry time to write in between.
    await asyncio.sleep(0.01)
    return ActionResult(Status.OK, document=document)


async def crash_action(ctx: StepContext[EmptyConfig]) -> ActionResult:
    record_call(ctx)
    raise ValueError("boom")


async def hold_action(ctx: StepContext[EmptyConfig]) -> ActionResult:
    """Block for a minute on the first call of a job, and return OK at once on later calls."""
    if record_call(ctx) == 1:
        HOLD_STARTED[ctx.job_id].set()
        await asyncio.sleep(60)
    return ActionResult(Status.OK)


TEST_ACTIONS = [
    ActionSpec("test.result", result_action, ResultConfig),
    ActionSpec("test.flaky", flaky_action, FlakyConfig),
    ActionSpec("test.queued", queued_action, QueuedConfig),
    ActionSpec("test.rewrite", rewrite_action, RewriteConfig),
    ActionSpec("test.append", append_action, AppendConfig),
    ActionSpec("test.crash", crash_action, EmptyConfig),
    ActionSpec("test.hold", hold_action, EmptyConfig),
]


def registry_with_test_actions() -> ActionRegistry:
    """Return the built-in actions plus the test actions of this module."""
    return ActionRegistry([*builtin_actions(), *TEST_ACTIONS])


def result_step(step_id: str, status: str = "OK", **config: Any) -> dict[str, Any]:
    """Return a workflow step that runs ``test.result`` with the given outcome."""
    return {"id": step_id, "action": "test.result", "config": {"status": status, **config}}


async def submit(
    raw: RawCommands, command: dict[str, Any], *, timeout_s: float = 10.0
) -> tuple[AbstractIncomingMessage, Job]:
    """Publish a create-job command and return its reply with the job in it."""
    reply = await raw.send(command, timeout=timeout_s)
    return reply, Job.model_validate(reply_json(reply))


async def listen_on_new_queue(connection: AbstractRobustConnection) -> tuple[str, Captured]:
    """Declare an exclusive queue, collect what arrives on it, and return its name."""
    captured = Captured()
    channel = await connection.channel()
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)

    async def on_message(message: AbstractIncomingMessage) -> None:
        captured.messages.append(message)
        captured.arrived.set()

    await queue.consume(on_message, no_ack=True)
    return queue.name, captured


def step_ids(intents: list[Intent]) -> list[str]:
    return [intent.step_id for intent in intents]


def event_statuses(intent: Intent) -> list[Status]:
    return [event.status for event in intent.events]


def intent_of(intents: list[Intent], step_id: str) -> Intent:
    matches = [intent for intent in intents if intent.step_id == step_id]
    assert len(matches) == 1, f"step {step_id}: {len(matches)} intents in {step_ids(intents)}"
    return matches[0]


async def poll_job(
    store: Store,
    job_id: str,
    predicate: Callable[[JobRecord], bool],
    *,
    timeout_s: float = 10.0,
    interval_s: float = 0.02,
) -> JobRecord:
    """Read the job until ``predicate`` holds, and fail with the last record after ``timeout_s``.

    Use it only for states that nothing publishes, such as a rescheduled step or an outbox mark.
    """
    deadline = time.monotonic() + timeout_s
    record = None
    while time.monotonic() < deadline:
        record = await store.get_job(job_id)
        if record is not None and predicate(record):
            return record
        await asyncio.sleep(interval_s)
    raise AssertionError(
        f"job {job_id} did not reach the expected state within {timeout_s} s: {summary(record)}"
    )


def summary(record: JobRecord | None) -> str:
    """Return the fields of a job that tell how far it got, for failure messages."""
    if record is None:
        return "not stored"
    intents = {intent.step_id: event_statuses(intent) for intent in record.intents}
    outbox = [(item.kind, item.message_type, item.state) for item in record.outbox]
    return (
        f"status={record.status} completed_at={record.completed_at} attempts={record.attempts} "
        f"owner={record.owner} due_at={record.due_at} intents={intents} outbox={outbox}"
    )


async def wait_until(
    condition: Callable[[], Awaitable[bool]], *, timeout_s: float = 10.0, what: str
) -> None:
    """Await ``condition`` until it is true, or fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
