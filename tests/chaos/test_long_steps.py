"""A step that outlasts several broker heartbeats.

The promise: a long step does not block the event loop, so the worker keeps
sending heartbeats, keeps its connection and completes the job.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.chaos.helpers import (
    HookServer,
    RabbitNode,
    WorkerCluster,
    new_job_id,
)

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(120)]

HEARTBEAT_S = 1
STEP_S = 4.0
JOBS = 3


def with_heartbeat(url: str, seconds: int) -> str:
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}heartbeat={seconds}"


def long_workflow(url: str) -> dict[str, Any]:
    return {
        "id": "long",
        "steps": [{"id": "notify", "action": "webhook", "config": {"url": url, "timeout_s": 30}}],
    }


async def test_long_step_keeps_connection(
    cluster: WorkerCluster, hook_server: HookServer, rabbit_node: RabbitNode
) -> None:
    url = hook_server.route("/long", delay_s=STEP_S)
    await cluster.put_workflows(long_workflow(url))
    worker = await cluster.start_ready(amqp_url=with_heartbeat(cluster.amqp_url, HEARTBEAT_S))
    heartbeats = await rabbit_node.heartbeats(f"pid {worker.pid}")
    replies = await cluster.inbox("test-replies")
    publisher = cluster.publisher()
    job_ids = [new_job_id() for _ in range(JOBS)]

    # When: every job runs a step four times as long as the heartbeat interval.
    for job_id in job_ids:
        body = {"id": job_id, "workflow_id": "long", "meta": {"long": "yes"}}
        assert await publisher.create(body, reply_to=replies.name, correlation_id=job_id)
    await publisher.close()
    answered = await replies.wait_for(
        lambda got: set(job_ids) <= {m.correlation_id for m in got}, timeout=60
    )

    # Then: the connection held, and each job completed with one call of its step.
    reply_types = sorted({m.type or "" for m in replies.messages})
    calls = hook_server.calls_by_job("/long")
    lost = worker.events("amqp.connection_lost")
    print(
        f"\nlong steps: heartbeat {heartbeats} s, {JOBS} steps of {STEP_S:g} s; "
        f"{len(lost)} amqp.connection_lost; replies {reply_types}"
    )
    assert heartbeats == [HEARTBEAT_S]
    assert answered
    assert lost == []
    assert reply_types == ["job.completed"]
    assert {job_id: len(calls.get(job_id, [])) for job_id in job_ids} == dict.fromkeys(job_ids, 1)
