"""Broker outages under load: closed connections and a stopped RabbitMQ application.

The promise: the worker reconnects by itself and consumes again, every command the
broker confirmed before, during and after the outage completes with its reply, the
logs record what happened, and a reply published while the broker is gone fails after
``TRANSFORM_PUBLISH_TIMEOUT_S`` instead of hanging, and goes out once it is back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.chaos.helpers import (
    CommandPublisher,
    FreezableProxy,
    HookServer,
    RabbitNode,
    WorkerCluster,
    WorkerProcess,
    eventually,
    new_job_id,
)
from tests.factories import load_envelope

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]

#: Confirmed commands wanted after the worker reconnected, before publishing stops.
JOBS_AFTER = 20
PUBLISH_PAUSE_S = 0.05


def flow_workflow(url: str) -> dict[str, Any]:
    return {
        "id": "flow",
        "steps": [
            {"id": "processing", "action": "silo.state", "config": {"state": "processing"}},
            {"id": "notify", "action": "webhook", "config": {"url": url, "timeout_s": 10}},
            {"id": "sent", "action": "silo.state", "config": {"state": "sent"}},
        ],
    }


@dataclass
class Load:
    """Publishes a command every ``PUBLISH_PAUSE_S``, filed by the phase it was confirmed in."""

    publisher: CommandPublisher
    reply_to: str
    phase: str = "before"
    confirmed: dict[str, list[str]] = field(default_factory=dict)
    unconfirmed: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def job_ids(self) -> set[str]:
        return {job_id for ids in self.confirmed.values() for job_id in ids}

    def count(self, phase: str) -> int:
        return len(self.confirmed.get(phase, []))

    async def run(self) -> None:
        envelope = load_envelope()
        while not self.stop.is_set():
            job_id = new_job_id()
            body = {"id": job_id, "workflow_id": "flow", "data": envelope}
            if await self.publisher.create(
                body, reply_to=self.reply_to, correlation_id=job_id, timeout_s=2
            ):
                self.confirmed.setdefault(self.phase, []).append(job_id)
            else:
                self.unconfirmed += 1
            await asyncio.sleep(PUBLISH_PAUSE_S)


async def close_connections(node: RabbitNode, worker: WorkerProcess) -> None:
    await node.close_all_connections()


async def restart_app(node: RabbitNode, worker: WorkerProcess) -> None:
    """Stop the broker application until the worker noticed, then start it again."""
    await node.stop_app()
    try:
        await worker.wait_for_event("amqp.connection_lost", timeout=30)
    finally:
        await node.start_app()


OUTAGES: dict[str, Callable[[RabbitNode, WorkerProcess], Awaitable[None]]] = {
    "close_connections": close_connections,
    "restart_app": restart_app,
}


@pytest.mark.parametrize("outage", sorted(OUTAGES))
async def test_outage_under_load(
    outage: str,
    cluster: WorkerCluster,
    hook_server: HookServer,
    disruptable_node: RabbitNode,
) -> None:
    url = hook_server.route("/notify", delay_s=0.3)
    await cluster.put_workflows(flow_workflow(url))
    worker = await cluster.start_ready(publish_timeout_s="1")
    replies = await cluster.inbox("test-replies")
    load = Load(cluster.publisher(), replies.name)
    publishing = asyncio.create_task(load.run())

    try:
        # Given: jobs flowing, some of them finished.
        assert await replies.wait_for(lambda got: len(got) >= 10, timeout=30)

        # When: the broker drops every connection.
        load.phase = "during"
        started = time.monotonic()
        await OUTAGES[outage](disruptable_node, worker)
        await worker.wait_for_event("amqp.reconnected", timeout=60)
        recovered_s = time.monotonic() - started
        load.phase = "after"
        await eventually(lambda: load.count("after") >= JOBS_AFTER, timeout=60)
    finally:
        load.stop.set()
        await publishing
        await load.publisher.close()

    # Then: every confirmed command completes and gets one reply.
    expected = load.job_ids
    jobs = await cluster.wait_settled(expected, timeout=45)
    await replies.wait_for(lambda got: expected <= {m.correlation_id for m in got}, timeout=20)
    by_correlation = replies.by_correlation_id()
    lost = sorted(expected - set(jobs))
    unfinished = sorted(j for j in expected - set(lost) if jobs[j].completed_at is None)
    without_reply = sorted(expected - set(by_correlation))
    conflicting = {
        c: ids for c, got in by_correlation.items() if len(ids := {m.message_id for m in got}) > 1
    }
    print(
        f"\n{outage}: {len(expected)} confirmed jobs ({load.count('before')} before, "
        f"{load.count('during')} during, {load.count('after')} after; "
        f"{load.unconfirmed} publishes not confirmed), worker reconnected "
        f"{recovered_s:.1f} s after the outage began; {len(lost)} lost, "
        f"{len(unfinished)} unfinished, {len(cluster.events('outbox.publish_failed'))} "
        "outbox.publish_failed"
    )
    assert worker.alive
    assert worker.events("amqp.connection_lost") != []
    assert load.count("after") >= JOBS_AFTER
    assert lost == []
    assert unfinished == []
    assert without_reply == []
    assert conflicting == {}


async def test_publish_fails_fast_while_app_stopped(
    cluster: WorkerCluster, hook_server: HookServer, disruptable_node: RabbitNode
) -> None:
    url = hook_server.route("/notify", delay_s=3.0)
    await cluster.put_workflows(flow_workflow(url))
    worker = await cluster.start_ready(publish_timeout_s="1")
    replies = await cluster.inbox("test-replies")
    publisher = cluster.publisher()
    job_id = new_job_id()
    body = {"id": job_id, "workflow_id": "flow", "data": load_envelope()}
    assert await publisher.create(body, reply_to=replies.name, correlation_id=job_id)
    await publisher.close()
    assert await eventually(lambda: hook_server.calls_to("/notify"), timeout=30)

    # When: the broker application stops while the job's webhook step runs, so the job
    # completes while its reply cannot be published.
    await disruptable_node.stop_app()
    stopped = time.monotonic()
    try:
        failure = await worker.wait_for_event(
            "outbox.publish_failed", timeout=30, where=lambda e: e.get("job_id") == job_id
        )
        failed_after_s = time.monotonic() - stopped
    finally:
        await disruptable_node.start_app()
    down_s = time.monotonic() - stopped

    # Then: the reply goes out once the broker is back.
    answered = await replies.wait_for(
        lambda got: any(m.correlation_id == job_id for m in got), timeout=60
    )
    reply_ids = {m.message_id for m in replies.messages if m.correlation_id == job_id}
    jobs = cluster.jobs()
    print(
        f"\npublish timeout: broker down {down_s:.1f} s; outbox.publish_failed "
        f"{failed_after_s:.1f} s after the stop ({failure.get('error')!r}); reply delivered: "
        f"{answered}"
    )
    assert answered
    assert len(reply_ids) == 1
    assert jobs[job_id].completed_at is not None
    assert worker.alive


async def test_publish_times_out_on_silent_broker(
    cluster: WorkerCluster, hook_server: HookServer, broker_proxy: FreezableProxy
) -> None:
    url = hook_server.route("/notify", delay_s=2.0)
    await cluster.put_workflows(flow_workflow(url))
    worker = await cluster.start_ready(amqp_url=broker_proxy.url, publish_timeout_s="1")
    replies = await cluster.inbox("test-replies")
    publisher = cluster.publisher()
    job_id = new_job_id()
    body = {"id": job_id, "workflow_id": "flow", "data": load_envelope()}
    assert await publisher.create(body, reply_to=replies.name, correlation_id=job_id)
    await publisher.close()
    assert await eventually(lambda: hook_server.calls_to("/notify"), timeout=30)

    # When: the worker's connection stays open but nothing comes back from the broker
    # while the job completes, so no publish is ever confirmed.
    broker_proxy.freeze()
    frozen = time.monotonic()
    try:
        failure = await worker.wait_for_event(
            "outbox.publish_failed", timeout=30, where=lambda e: e.get("job_id") == job_id
        )
        failed_after_s = time.monotonic() - frozen
    finally:
        broker_proxy.thaw()

    # Then: the reply goes out once the broker responds again.
    answered = await replies.wait_for(
        lambda got: any(m.correlation_id == job_id for m in got), timeout=60
    )
    reply_ids = {m.message_id for m in replies.messages if m.correlation_id == job_id}
    print(
        f"\nsilent broker: outbox.publish_failed {failed_after_s:.1f} s after the freeze "
        f"({failure.get('error')!r}); reply delivered: {answered}; "
        f"{len(replies.messages)} reply copies"
    )
    assert "did not confirm" in str(failure.get("error"))
    assert answered
    assert len(reply_ids) == 1
    assert worker.alive
