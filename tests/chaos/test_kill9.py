"""kill -9 under load: two workers, one of them SIGKILLed every 0.5–2 s while jobs arrive.

The promise: redelivery and resume lose no job, every caller gets its reply (a copy
carries the same ``message_id``), every job emits one completion event, and a step
that finished OK never runs again.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Any

import pytest

from contracts import Status
from tests.chaos.helpers import (
    HookServer,
    WorkerCluster,
    WorkerProcess,
    new_job_id,
    truncate_to_ms,
)
from tests.factories import load_envelope
from worker.models import JobRecord

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

JOBS = 300
KILLS = 15
BATCH = 15
#: Pause between batches, so that publishing lasts about as long as the killing.
PUBLISH_PAUSE_S = 0.6
WEBHOOK_STEP = "notify"
COMPLETION_EVENTS = ("job.completed", "job.failed")


def chaos_workflow(url: str) -> dict[str, Any]:
    return {
        "id": "chaos",
        "steps": [
            {"id": "processing", "action": "silo.state", "config": {"state": "processing"}},
            {
                "id": "number",
                "action": "sequence.enumerate",
                "config": {"name": "chaos", "prefix": "CH-", "padding": 5},
            },
            {"id": WEBHOOK_STEP, "action": "webhook", "config": {"url": url, "timeout_s": 5}},
            {"id": "sign", "action": "silo.close"},
            {"id": "sent", "action": "silo.state", "config": {"state": "sent"}},
        ],
        "rescue": [{"id": "mark-error", "action": "silo.state", "config": {"state": "error"}}],
    }


def webhook_ok_at(job: JobRecord) -> Any:
    """Return the time of the OK event of the job's completed webhook intent, or None."""
    for intent in job.intents:
        if intent.step_id == WEBHOOK_STEP and intent.completed:
            last = intent.events[-1]
            return last.at if last.status is Status.OK else None
    return None


def document_number(job: JobRecord) -> int | None:
    """Return the number ``sequence.enumerate`` gave the job's document, or None."""
    if job.envelope is None:
        return None
    return int(str(job.envelope["doc"]["code"]).removeprefix("CH-"))


async def test_kill9_loses_nothing(cluster: WorkerCluster, hook_server: HookServer) -> None:
    seed = int(os.environ.get("TRANSFORM_TEST_CHAOS_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    delays = random.Random(seed + 1)
    url = hook_server.route("/notify", delay_s=lambda: delays.uniform(0.1, 1.0))
    await cluster.put_workflows(chaos_workflow(url))
    workers: dict[str, WorkerProcess] = {
        "a": await cluster.start_ready("a"),
        "b": await cluster.start_ready("b"),
    }
    replies = await cluster.inbox("test-replies")
    events = await cluster.inbox("test-events", bind_to="events")
    publisher = cluster.publisher()
    envelope = load_envelope()
    #: Job id → correlation id of its command.
    published: dict[str, str] = {}
    started = time.monotonic()

    # When: jobs arrive while a random worker is SIGKILLed and restarted at once.
    async def publish_all() -> None:
        for batch in range(JOBS // BATCH):
            ids = [new_job_id() for _ in range(BATCH)]
            confirmed = await asyncio.gather(
                *(
                    publisher.create(
                        {
                            "id": job_id,
                            "workflow_id": "chaos",
                            "data": envelope,
                            "meta": {"batch": str(batch)},
                        },
                        reply_to=replies.name,
                        correlation_id=f"c-{job_id}",
                    )
                    for job_id in ids
                )
            )
            assert all(confirmed), "the broker did not confirm a command"
            published.update({job_id: f"c-{job_id}" for job_id in ids})
            await asyncio.sleep(PUBLISH_PAUSE_S)

    async def kill_loop() -> None:
        for _ in range(KILLS):
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            name = rng.choice(sorted(workers))
            workers[name].kill()
            workers[name] = cluster.start(name)

    try:
        await asyncio.gather(publish_all(), kill_loop())
    finally:
        await publisher.close()

    # Then: every job completes and owes nothing.
    expected = set(published)
    correlation_ids = set(published.values())
    jobs = await cluster.wait_settled(expected, timeout=150)
    await replies.wait_for(
        lambda got: correlation_ids <= {m.correlation_id for m in got}, timeout=30
    )
    await events.wait_for(
        lambda got: expected <= {m.job_id for m in got if m.type in COMPLETION_EVENTS},
        timeout=30,
    )
    elapsed = time.monotonic() - started

    lost = sorted(expected - set(jobs))
    unfinished = sorted(j for j in expected - set(lost) if jobs[j].completed_at is None)
    failed = sorted(j for j in expected - set(lost) if jobs[j].faults)
    unsent = sorted(
        j for j in expected - set(lost) if any(item.state != "sent" for item in jobs[j].outbox)
    )

    by_correlation = replies.by_correlation_id()
    without_reply = sorted(correlation_ids - set(by_correlation))
    reply_ids = {c: {m.message_id for m in got} for c, got in by_correlation.items()}
    conflicting_replies = {c: ids for c, ids in reply_ids.items() if len(ids) > 1}
    wrong_reply_types = sorted(
        {m.type or "" for got in by_correlation.values() for m in got} - {"job.completed"}
    )
    raw_duplicate_replies = sum(len(got) - 1 for got in by_correlation.values())

    completion_ids: dict[str, set[str | None]] = {}
    for message in events.messages:
        if message.type in COMPLETION_EVENTS and message.job_id in expected:
            completion_ids.setdefault(message.job_id, set()).add(message.message_id)
    wrong_completion_counts = {
        j: len(completion_ids.get(j, set()))
        for j in expected
        if len(completion_ids.get(j, set())) != 1
    }
    duplicate_events = sum(
        1 for message in events.messages if message.type in COMPLETION_EVENTS
    ) - sum(len(ids) for ids in completion_ids.values())

    calls = hook_server.calls_by_job("/notify")
    uncalled = sorted(j for j in expected if j not in calls)
    late_calls = []
    for job_id in sorted(expected - set(lost)):
        ok_at = webhook_ok_at(jobs[job_id])
        for call in calls.get(job_id, []):
            if ok_at is None or truncate_to_ms(call.arrived_at) > ok_at:
                late_calls.append((job_id, call.arrived_at.isoformat(), ok_at))
    webhook_reruns = sum(len(c) - 1 for j, c in calls.items() if j in expected)
    jobs_rerun = sum(1 for j, c in calls.items() if j in expected and len(c) > 1)

    numbers = sorted(
        number for j in expected - set(lost) if (number := document_number(jobs[j])) is not None
    )

    print(
        f"\nkill -9: {len(expected)} jobs, {KILLS} kills (seed {seed}) in {elapsed:.1f} s; "
        f"{len(lost)} lost, {len(unfinished)} unfinished, {len(failed)} failed; "
        f"webhook step re-run {webhook_reruns} times in {jobs_rerun} jobs "
        f"({len(cluster.events('job.resumed'))} job.resumed); "
        f"{raw_duplicate_replies} duplicate replies with the same message_id, "
        f"{duplicate_events} duplicate completion events"
    )
    assert lost == []
    assert unfinished == []
    assert failed == []
    assert unsent == []
    assert without_reply == []
    assert conflicting_replies == {}
    assert wrong_reply_types == []
    assert wrong_completion_counts == {}
    assert uncalled == []
    assert late_calls == []
    assert numbers == list(range(1, JOBS + 1))
