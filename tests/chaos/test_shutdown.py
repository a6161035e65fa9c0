"""SIGTERM to a busy worker subprocess, once and twice.

The promise: on SIGTERM the worker stops consuming, finishes its running jobs within
``TRANSFORM_SHUTDOWN_GRACE_S``, gives its prefetched commands back to the queue,
logs ``worker.stopping`` and ``worker.stopped`` and exits 0. A second SIGTERM ends
the grace period at once. The jobs it cut short are released, and another worker
completes them.
"""

from __future__ import annotations

import itertools
import signal
import time
from typing import Any

import pytest

from tests.chaos.helpers import (
    HookServer,
    WorkerCluster,
    WorkerProcess,
    eventually,
    new_job_id,
    ready_messages,
)

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(120)]


def hook_workflow(url: str) -> dict[str, Any]:
    return {
        "id": "slow",
        "steps": [{"id": "notify", "action": "webhook", "config": {"url": url, "timeout_s": 30}}],
    }


async def publish_jobs(cluster: WorkerCluster, reply_to: str, count: int) -> list[str]:
    publisher = cluster.publisher()
    job_ids = [new_job_id() for _ in range(count)]
    try:
        for number, job_id in enumerate(job_ids):
            body = {"id": job_id, "workflow_id": "slow", "meta": {"n": str(number)}}
            assert await publisher.create(body, reply_to=reply_to, correlation_id=job_id)
    finally:
        await publisher.close()
    return job_ids


def job_ids_logged(worker: WorkerProcess, event: str) -> set[str]:
    return {str(entry.get("job_id")) for entry in worker.events(event)}


def accepted_after_stopping(worker: WorkerProcess) -> list[str]:
    """Return the jobs the worker accepted after it logged ``worker.stopping``."""
    entries = worker.logs()
    events = [entry.get("event") for entry in entries]
    if "worker.stopping" not in events:
        return []
    start = events.index("worker.stopping")
    return [str(e.get("job_id")) for e in entries[start:] if e.get("event") == "job.accepted"]


async def test_sigterm_drains_then_exits(cluster: WorkerCluster, hook_server: HookServer) -> None:
    url = hook_server.route("/slow", delay_s=1.0)
    await cluster.put_workflows(hook_workflow(url))
    first = await cluster.start_ready("first", prefetch="4", shutdown_grace_s="10")
    replies = await cluster.inbox("test-replies")
    job_ids = await publish_jobs(cluster, replies.name, 20)
    assert await eventually(lambda: len(hook_server.calls_to("/slow")) >= 4, timeout=30)

    # When: the worker gets SIGTERM with four jobs running and a backlog queued.
    first.send(signal.SIGTERM)
    status = await first.wait_exit(timeout=30)
    stored = set(cluster.jobs())
    queued = await ready_messages(cluster.amqp_url, cluster.exchange("jobs"))

    # Then: another worker completes the backlog the first one gave back.
    second = await cluster.start_ready("second")
    jobs = await cluster.wait_settled(set(job_ids), timeout=60)
    await replies.wait_for(lambda got: set(job_ids) <= {m.correlation_id for m in got}, 20)
    without_reply = sorted(set(job_ids) - set(replies.by_correlation_id()))
    accepted_by_first = job_ids_logged(first, "job.accepted")
    completed_by_first = job_ids_logged(first, "job.completed")
    stopped = first.events("worker.stopped")
    calls = hook_server.calls_by_job("/slow")
    print(
        f"\nSIGTERM: exit status {status}; the first worker accepted "
        f"{len(accepted_by_first)} jobs and completed {len(completed_by_first)} of them; "
        f"{queued} commands back in the queue; the second worker completed "
        f"{len(job_ids_logged(second, 'job.completed'))}"
    )
    assert status == 0
    assert first.events("worker.stopping") != []
    assert stopped != []
    assert stopped[-1].get("jobs_cancelled") == 0
    assert len(accepted_by_first) >= 4
    assert accepted_by_first == completed_by_first
    assert accepted_after_stopping(first) == []
    assert queued == len(job_ids) - len(stored)
    assert sorted(j for j in job_ids if j not in jobs or jobs[j].completed_at is None) == []
    assert {j: len(c) for j, c in calls.items() if len(c) != 1} == {}
    assert without_reply == []


async def test_second_sigterm_skips_grace(cluster: WorkerCluster, hook_server: HookServer) -> None:
    # The two calls of the first worker hang for 20 s; the second worker's calls are quick.
    numbers = itertools.count()
    url = hook_server.route("/slow", delay_s=lambda: 20.0 if next(numbers) < 2 else 0.05)
    await cluster.put_workflows(hook_workflow(url))
    first = await cluster.start_ready("first", prefetch="2", shutdown_grace_s="60")
    replies = await cluster.inbox("test-replies")
    job_ids = await publish_jobs(cluster, replies.name, 2)
    assert await eventually(lambda: len(hook_server.calls_to("/slow")) >= 2, timeout=30)

    # When: a second SIGTERM arrives while the worker waits for its running jobs.
    first.send(signal.SIGTERM)
    await first.wait_for_event("worker.draining", timeout=30)
    first.send(signal.SIGTERM)
    signalled = time.monotonic()
    status = await first.wait_exit(timeout=30)
    exit_s = time.monotonic() - signalled
    answered_before_exit = [c.job_id for c in hook_server.calls_to("/slow") if c.answered.is_set()]

    # Then: the jobs it cut short are released, and another worker completes them.
    second = await cluster.start_ready("second")
    jobs = await cluster.wait_settled(set(job_ids), timeout=60)
    await replies.wait_for(lambda got: set(job_ids) <= {m.correlation_id for m in got}, 20)
    without_reply = sorted(set(job_ids) - set(replies.by_correlation_id()))
    stopped = first.events("worker.stopped")
    print(
        f"\nsecond SIGTERM: exit status {status} {exit_s:.1f} s after it; "
        f"{len(answered_before_exit)} webhook calls answered before the exit; "
        f"released {sorted(job_ids_logged(first, 'job.released'))}; resumed by the second "
        f"worker {sorted(job_ids_logged(second, 'job.resumed'))}"
    )
    assert status == 0
    assert answered_before_exit == []
    assert stopped != []
    assert stopped[-1].get("jobs_cancelled") == 2
    assert job_ids_logged(first, "job.released") == set(job_ids)
    assert sorted(j for j in job_ids if j not in jobs or jobs[j].completed_at is None) == []
    assert sorted(j for j in job_ids if j in jobs and jobs[j].faults) == []
    assert without_reply == []
