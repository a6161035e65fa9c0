"""Many copies of one command at once: one job, every caller answered, no stall."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aio_pika.abc import AbstractRobustConnection

from tests.conftest import (
    RawCommands,
    WorkerFactory,
    capture,
    fast_settings,
    reply_json,
    reply_status,
)
from tests.factories import load_envelope, new_id

COPIES = 150
WORKFLOW = {"id": "state", "steps": [{"action": "silo.state", "config": {"state": "sent"}}]}


async def test_duplicate_storm_answers_everyone(
    start_worker: WorkerFactory, tmp_path: Path, amqp: AbstractRobustConnection
) -> None:
    # A lease far longer than the wait below: a runner that gave up on its writes
    # would leave the job until the lease ends, and the replies would not come in time.
    worker = await start_worker(fast_settings(tmp_path, lease_s=60.0, prefetch=32))
    await worker.put_workflow(WORKFLOW)
    namespace = worker.settings.amqp_namespace
    events = await capture(amqp, f"{namespace}.events", "#")
    raw = RawCommands(await amqp.channel(), namespace)
    await raw.start()
    body = {"id": new_id(), "workflow_id": "state", "data": load_envelope()}

    sent = await asyncio.gather(*(raw.publish(body) for _ in range(COPIES)))
    replies = await asyncio.gather(*(raw.reply(correlation, timeout=15) for correlation in sent))

    assert {reply.type for reply in replies} == {"job.completed"}
    assert {reply_status(reply) for reply in replies} == {200}
    assert {reply_json(reply)["id"] for reply in replies} == {body["id"]}
    for correlation in sent:
        assert len(raw.replies_to(correlation)) == 1
    accepted = await events.wait_for(lambda m: m.type == "job.accepted")
    assert accepted.headers["x-job-id"] == body["id"]
    assert len(events.of_type("job.accepted")) == 1
