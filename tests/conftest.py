"""Shared fixtures: a worker on the real broker and a real SQLite file, per test.

Every test gets its own AMQP namespace (``t<hex>.commands``, ``t<hex>.jobs``, …) and
its own database file, so tests never see each other's messages or jobs. When the
broker is down the broker tests skip, except under CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import structlog
import uuid6
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from pydantic import BaseModel, ConfigDict, Field

from contracts import Job, Workflow
from contracts.client import JobsClient
from worker.actions.base import ActionResult, ActionSpec, StepContext
from worker.actions.registry import ActionRegistry, builtin_actions, default_registry
from worker.models import WorkflowRecord
from worker.service import Worker
from worker.settings import Settings
from worker.store.base import Store
from worker.workflows import put_workflow

AMQP_URL = os.environ.get("TRANSFORM_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def broker_reachable(host: str = "127.0.0.1", port: int = 5672) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def broker() -> str:
    """The broker URL; skips the test locally (fails it in CI) when nothing listens."""
    if not broker_reachable():
        message = "RabbitMQ is not reachable on 127.0.0.1:5672"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return AMQP_URL


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    yield
    structlog.reset_defaults()


def fast_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings with every delay shrunk so that retries and leases take milliseconds."""
    values: dict[str, Any] = {
        "amqp_url": AMQP_URL,
        "amqp_namespace": f"t{uuid6.uuid7().hex}",
        "store_url": f"sqlite:///{tmp_path / 'transform.db'}",
        "data_dir": tmp_path / "data",
        "prefetch": 16,
        "shutdown_grace_s": 5.0,
        "publish_timeout_s": 5.0,
        "lease_s": 2.0,
        "sweep_interval_s": 0.05,
        "outbox_retry_s": 1.0,
        "retry_inline_attempts": 2,
        "retry_inline_initial_s": 0.01,
        "retry_inline_max_s": 0.02,
        "retry_first_s": 0.05,
        "retry_doubling_max_s": 0.2,
        "retry_steady_s": 0.3,
        "retry_total_s": 5.0,
        "sqlite_synchronous": "normal",
        "workflow_cache_s": 0.0,
        "metrics_host": "127.0.0.1",
        "metrics_port": 0,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(tmp_path: Path, broker: str) -> Settings:
    return fast_settings(tmp_path)


@dataclass
class RunningWorker:
    """A worker running in the test's event loop."""

    worker: Worker
    task: asyncio.Task[None]
    settings: Settings

    @property
    def store(self) -> Store:
        assert self.worker.engine is not None
        return self.worker.engine.store

    async def put_workflow(self, definition: dict[str, Any]) -> WorkflowRecord:
        return await put_workflow(
            self.store, self.worker.registry, Workflow.model_validate(definition)
        )

    async def stop(self, *, immediate: bool = False) -> None:
        self.worker.request_stop(immediate=immediate)
        await asyncio.wait_for(self.task, timeout=30)


WorkerFactory = Callable[..., Awaitable[RunningWorker]]


@pytest.fixture
async def start_worker(broker: str) -> AsyncIterator[WorkerFactory]:
    """Start workers on given settings; all are stopped and their topology deleted after."""
    started: list[RunningWorker] = []

    async def start(settings: Settings, *, registry: ActionRegistry | None = None) -> RunningWorker:
        worker = Worker(settings, registry=registry or default_registry(plugins=False))
        task = asyncio.create_task(worker.run())
        started_wait = asyncio.create_task(worker.started.wait())
        done, _ = await asyncio.wait({task, started_wait}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            started_wait.cancel()
            task.result()
        running = RunningWorker(worker, task, settings)
        started.append(running)
        return running

    yield start

    namespaces = set()
    for running in started:
        namespaces.add(running.settings.amqp_namespace)
        if not running.task.done():
            await running.stop(immediate=True)
    await delete_topology(namespaces)


async def delete_topology(namespaces: set[str]) -> None:
    if not namespaces:
        return
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        for namespace in namespaces:
            channel = await connection.channel()
            for queue in ("jobs", "dead"):
                await channel.queue_delete(f"{namespace}.{queue}")
            for exchange in ("commands", "unrouted", "events", "dead"):
                await channel.exchange_delete(f"{namespace}.{exchange}")
            await channel.close()


@pytest.fixture
async def worker(start_worker: WorkerFactory, settings: Settings) -> RunningWorker:
    return await start_worker(settings)


@pytest.fixture
async def client(worker: RunningWorker) -> AsyncIterator[JobsClient]:
    async with JobsClient(
        AMQP_URL, namespace=worker.settings.amqp_namespace, timeout_s=15
    ) as jobs_client:
        yield jobs_client


@dataclass
class Captured:
    """Messages collected from a queue bound to the worker's events or dead letters."""

    messages: list[AbstractIncomingMessage] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_for(
        self, predicate: Callable[[AbstractIncomingMessage], bool], timeout: float = 10
    ) -> AbstractIncomingMessage:
        async def find() -> AbstractIncomingMessage:
            while True:
                for message in self.messages:
                    if predicate(message):
                        return message
                self.arrived.clear()
                await self.arrived.wait()

        return await asyncio.wait_for(find(), timeout)

    def of_type(self, message_type: str) -> list[AbstractIncomingMessage]:
        return [m for m in self.messages if m.type == message_type]

    def bodies(self, message_type: str) -> list[dict[str, Any]]:
        return [json.loads(m.body) for m in self.of_type(message_type)]


@pytest.fixture
async def amqp(broker: str) -> AsyncIterator[AbstractRobustConnection]:
    connection = await aio_pika.connect_robust(broker)
    async with connection:
        yield connection


@pytest.fixture
async def events(worker: RunningWorker, amqp: AbstractRobustConnection) -> Captured:
    """Every message published to the worker's events exchange from now on."""
    return await capture(amqp, f"{worker.settings.amqp_namespace}.events", "#")


@pytest.fixture
async def dead_letters(worker: RunningWorker, amqp: AbstractRobustConnection) -> Captured:
    """Every message the worker dead-letters from now on."""
    return await capture(amqp, f"{worker.settings.amqp_namespace}.dead", "")


async def capture(connection: AbstractRobustConnection, exchange: str, key: str) -> Captured:
    captured = Captured()
    channel = await connection.channel()
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(exchange, key)

    async def on_message(message: AbstractIncomingMessage) -> None:
        captured.messages.append(message)
        captured.arrived.set()

    await queue.consume(on_message, no_ack=True)
    return captured


class RawCommands:
    """Publishes arbitrary bytes and properties as commands, and awaits their replies."""

    def __init__(self, channel: aio_pika.abc.AbstractChannel, namespace: str) -> None:
        self.channel = channel
        self.namespace = namespace
        self.replies: aio_pika.abc.AbstractQueue | None = None
        self._waiting: dict[str, asyncio.Future[AbstractIncomingMessage]] = {}
        self.received: list[AbstractIncomingMessage] = []

    async def start(self) -> None:
        self.replies = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        await self.replies.consume(self._on_reply, no_ack=True)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        self.received.append(message)
        future = self._waiting.get(message.correlation_id or "")
        if future is not None and not future.done():
            future.set_result(message)

    async def publish(
        self,
        body: bytes | dict[str, Any],
        *,
        routing_key: str = "job.create",
        content_type: str | None = "application/json",
        reply: bool = True,
        correlation_id: str | None = None,
        **properties: Any,
    ) -> str:
        """Publish one command; return its correlation id."""
        assert self.replies is not None
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        correlation_id = correlation_id or str(uuid6.uuid7())
        self._waiting.setdefault(correlation_id, asyncio.get_running_loop().create_future())
        reply_to = properties.pop("reply_to", self.replies.name if reply else None)
        message = aio_pika.Message(
            data,
            content_type=content_type,
            correlation_id=correlation_id,
            reply_to=reply_to,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            **properties,
        )
        exchange = await self.channel.get_exchange(f"{self.namespace}.commands", ensure=False)
        await exchange.publish(message, routing_key)
        return correlation_id

    async def reply(self, correlation_id: str, timeout: float = 10) -> AbstractIncomingMessage:
        return await asyncio.wait_for(self._waiting[correlation_id], timeout)

    async def send(
        self, body: bytes | dict[str, Any], timeout: float = 10, **kwargs: Any
    ) -> AbstractIncomingMessage:
        """Publish one command and return its reply."""
        correlation_id = await self.publish(body, **kwargs)
        return await self.reply(correlation_id, timeout)

    def replies_to(self, correlation_id: str) -> list[AbstractIncomingMessage]:
        return [m for m in self.received if m.correlation_id == correlation_id]


@pytest.fixture
async def raw(worker: RunningWorker, amqp: AbstractRobustConnection) -> RawCommands:
    channel = await amqp.channel()
    commands = RawCommands(channel, worker.settings.amqp_namespace)
    await commands.start()
    return commands


def reply_json(message: AbstractIncomingMessage) -> dict[str, Any]:
    """The reply's body, parsed."""
    body: dict[str, Any] = json.loads(message.body)
    return body


def reply_status(message: AbstractIncomingMessage) -> int:
    status = (message.headers or {}).get("x-status")
    assert isinstance(status, int), f"x-status header missing: {message.headers}"
    return status


# A test action and a probe job, shared by the AMQP tests of replies, rejections and
# creation rules.


class NapConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(default=0.0, ge=0, le=30)


async def nap(ctx: StepContext[NapConfig]) -> ActionResult:
    """Wait ``seconds``, then succeed: a step that needs no silo entry and takes a set time."""
    await asyncio.sleep(ctx.config.seconds)
    return ActionResult()


def registry_with_nap() -> ActionRegistry:
    """Return the built-in actions plus ``test.nap``."""
    return ActionRegistry([*builtin_actions(), ActionSpec("test.nap", nap, NapConfig)])


#: A workflow that runs one instant ``test.nap`` step, so a meta-only job completes.
NAP_WORKFLOW: dict[str, Any] = {
    "id": "nap",
    "steps": [{"id": "nap", "action": "test.nap", "config": {"seconds": 0}}],
}


async def start_nap_worker(start: WorkerFactory, settings: Settings) -> RunningWorker:
    """Start a worker with the ``test.nap`` action registered and the ``nap`` workflow stored."""
    running = await start(settings, registry=registry_with_nap())
    await running.put_workflow(NAP_WORKFLOW)
    return running


async def run_probe_job(client: JobsClient) -> Job:
    """Create a meta-only ``nap`` job and return it once completed.

    Tests call it after a bad command to show that the worker still consumes.
    """
    return await client.create_job({"workflow_id": "nap", "meta": {"probe": "yes"}}, wait=10)


def job_events(events: Captured, job_id: str, message_type: str) -> list[AbstractIncomingMessage]:
    """Return the captured events of one type whose ``x-job-id`` header is ``job_id``."""
    return [m for m in events.of_type(message_type) if (m.headers or {}).get("x-job-id") == job_id]


async def flush_events(client: JobsClient, events: Captured) -> None:
    """Run a probe job and wait for its ``job.completed`` event.

    The worker publishes every event on one channel, and RabbitMQ keeps the order of
    one channel's messages to one queue, so once the probe's event has arrived, every
    event the worker published before it has arrived too.
    """
    probe = await run_probe_job(client)
    await events.wait_for(
        lambda m: m.type == "job.completed" and (m.headers or {}).get("x-job-id") == probe.id
    )


async def flush_replies(raw: RawCommands) -> None:
    """Send a ``job.get`` and wait for its reply.

    The worker publishes every reply on one channel, so a reply it sent to ``raw``'s
    queue before this one has arrived by the time this one does.
    """
    await raw.send({"key": "flush-replies"}, routing_key="job.get")
