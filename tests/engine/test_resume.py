"""Resuming interrupted jobs, claims with fencing tokens, and expired leases."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from aio_pika.abc import AbstractRobustConnection

from contracts import Event, Intent, Status, utc_now
from contracts.client import JobsClient
from tests.conftest import (
    AMQP_URL,
    Captured,
    RunningWorker,
    WorkerFactory,
    capture,
    fast_settings,
)
from tests.engine.helpers import (
    HOLD_STARTED,
    calls,
    poll_job,
    registry_with_test_actions,
    result_step,
    step_ids,
    wait_until,
)
from tests.factories import job_record, new_id
from worker.engine.handle import claim
from worker.errors import FencedOut
from worker.models import JobRecord
from worker.settings import Settings
from worker.store.sqlite import SqliteStore

KEY_CUTOFF = timedelta(days=730)


@pytest.fixture
async def worker(start_worker: WorkerFactory, settings: Settings) -> RunningWorker:
    return await start_worker(settings, registry=registry_with_test_actions())


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    sqlite = SqliteStore(tmp_path / "fence.db", synchronous="normal")
    await sqlite.open()
    yield sqlite
    await sqlite.close()


async def insert(store: SqliteStore, record: JobRecord) -> None:
    result = await store.insert_job(record, key_taken_since=utc_now() - KEY_CUTOFF)
    assert result.status == "created"


async def test_restart_resumes_after_ok_steps(
    start_worker: WorkerFactory, settings: Settings, amqp: AbstractRobustConnection
) -> None:
    registry = registry_with_test_actions()
    first = await start_worker(settings, registry=registry)
    events = await capture(amqp, f"{settings.amqp_namespace}.events", "#")
    await first.put_workflow(
        {
            "id": "resume",
            "steps": [
                result_step("a"),
                result_step("b"),
                {"id": "hold", "action": "test.hold"},
                result_step("c"),
            ],
        }
    )
    job_id = new_id()
    async with JobsClient(AMQP_URL, namespace=settings.amqp_namespace, timeout_s=20) as client:
        reply = asyncio.create_task(
            client.create_job({"id": job_id, "workflow_id": "resume", "meta": {"k": "v"}})
        )
        await asyncio.wait_for(HOLD_STARTED[job_id].wait(), timeout=10)

        await first.stop(immediate=True)
        second = await start_worker(settings, registry=registry)
        job = await asyncio.wait_for(reply, timeout=20)

    stored = await second.store.get_job(job_id)
    assert stored is not None
    # The job was claimed twice, at acceptance by the first worker and then by the second.
    assert stored.fence == 2

    assert job.id == job_id
    assert job.completed_at is not None
    assert job.status is Status.OK
    assert step_ids(job.intents) == ["a", "b", "hold", "c"]
    assert calls(job_id, "a") == 1
    assert calls(job_id, "b") == 1
    assert calls(job_id, "hold") == 2
    assert calls(job_id, "c") == 1
    await events.wait_for(lambda m: m.type == "job.completed")
    assert [m.type for m in events.messages] == ["job.accepted", "job.completed"]


async def test_immediate_stop_releases_job(
    start_worker: WorkerFactory, settings: Settings, tmp_path: Path
) -> None:
    running = await start_worker(settings, registry=registry_with_test_actions())
    await running.put_workflow(
        {"id": "resume", "steps": [result_step("a"), {"id": "hold", "action": "test.hold"}]}
    )
    job_id = new_id()
    async with JobsClient(AMQP_URL, namespace=settings.amqp_namespace) as client:
        await client.publish(
            "job.create", {"id": job_id, "workflow_id": "resume", "meta": {"k": "v"}}
        )
        await asyncio.wait_for(HOLD_STARTED[job_id].wait(), timeout=10)

        await running.stop(immediate=True)

    store = SqliteStore(tmp_path / "transform.db", synchronous="normal")
    await store.open()
    try:
        stored = await store.get_job(job_id)
    finally:
        await store.close()
    assert stored is not None
    assert stored.completed_at is None
    assert stored.owner is None
    assert stored.due_at is not None
    # The stop released the job at once instead of leaving it until the 2 s lease ends.
    assert stored.due_at <= utc_now()
    assert step_ids(stored.intents) == ["a", "hold"]
    # The held step was written as started (RUN) before it ran, and never finished.
    assert stored.intents[1].completed is False
    assert stored.intents[1].events[-1].status == "RUN"


async def test_graceful_stop_finishes_job(start_worker: WorkerFactory, settings: Settings) -> None:
    running = await start_worker(settings, registry=registry_with_test_actions())
    await running.put_workflow({"id": "resume", "steps": [result_step("slow", sleep_s=0.5)]})
    job_id = new_id()
    async with JobsClient(AMQP_URL, namespace=settings.amqp_namespace, timeout_s=20) as client:
        reply = asyncio.create_task(
            client.create_job({"id": job_id, "workflow_id": "resume", "meta": {"k": "v"}})
        )
        await wait_until(
            lambda: _is_called(job_id, "slow"), what="the slow step to start", timeout_s=10
        )

        await running.stop()
        job = await asyncio.wait_for(reply, timeout=10)

    assert job.completed_at is not None
    assert job.status is Status.OK
    assert calls(job_id, "slow") == 1


async def _is_called(job_id: str, step_id: str) -> bool:
    return calls(job_id, step_id) > 0


async def test_long_step_keeps_lease(start_worker: WorkerFactory, settings: Settings) -> None:
    # Two workers share the queue and the file, and the step outlives the 2 s lease.
    # Only lease renewal keeps the idle worker's sweeper from claiming the job.
    registry = registry_with_test_actions()
    first = await start_worker(settings, registry=registry)
    await start_worker(settings, registry=registry)
    await first.put_workflow({"id": "resume", "steps": [result_step("long", sleep_s=3)]})

    async with JobsClient(AMQP_URL, namespace=settings.amqp_namespace, timeout_s=20) as client:
        job = await client.create_job({"workflow_id": "resume", "meta": {"k": "v"}})

    assert job.status is Status.OK
    assert calls(job.id, "long") == 1
    stored = await first.store.get_job(job.id)
    assert stored is not None
    assert stored.fence == 1


async def test_resume_uses_recorded_version(
    start_worker: WorkerFactory, tmp_path: Path, broker: str
) -> None:
    settings = fast_settings(
        tmp_path, retry_first_s=0.5, retry_doubling_max_s=0.5, retry_steady_s=0.5
    )
    running = await start_worker(settings, registry=registry_with_test_actions())
    flaky = {"id": "a", "action": "test.flaky", "config": {"failures": 2}}
    first_version = await running.put_workflow({"id": "resume", "steps": [flaky, result_step("b")]})
    job_id = new_id()
    async with JobsClient(AMQP_URL, namespace=settings.amqp_namespace, timeout_s=20) as client:
        reply = asyncio.create_task(
            client.create_job({"id": job_id, "workflow_id": "resume", "meta": {"k": "v"}})
        )
        await poll_job(running.store, job_id, lambda job: job.status is Status.ERR)

        await running.put_workflow({"id": "resume", "steps": [flaky, result_step("b2")]})
        job = await asyncio.wait_for(reply, timeout=20)

    assert job.workflow_version == first_version.version
    assert step_ids(job.intents) == ["a", "b"]


async def test_claim_increments_fence(store: SqliteStore) -> None:
    record = job_record(due_in_s=-1, fence=4)
    await insert(store, record)

    handle = await claim(store, record, owner="worker-a", lease_s=30)

    assert handle is not None
    assert handle.fence == 5
    stored = await store.get_job(record.id)
    assert stored is not None
    assert stored.fence == 5
    assert stored.owner == "worker-a"


async def test_stale_handle_fenced_out(store: SqliteStore) -> None:
    record = job_record(due_in_s=-1)
    await insert(store, record)
    # A zero lease makes the job due again at once, as if the first runner had died.
    stale = await claim(store, record, owner="worker-a", lease_s=0)
    assert stale is not None
    fresh_record = await store.get_job(record.id)
    assert fresh_record is not None
    newer = await claim(store, fresh_record, owner="worker-b", lease_s=30)
    assert newer is not None

    def set_meta(job: JobRecord) -> None:
        job.meta["writer"] = "stale"

    with pytest.raises(FencedOut):
        await stale.write(set_meta)
    stored = await store.get_job(record.id)
    assert stored is not None
    assert stored.owner == "worker-b"
    assert "writer" not in stored.meta


async def test_current_handle_writes(store: SqliteStore) -> None:
    record = job_record(due_in_s=-1)
    await insert(store, record)
    handle = await claim(store, record, owner="worker-a", lease_s=30)
    assert handle is not None

    await handle.write(lambda job: job.meta.update({"writer": "current"}))

    stored = await store.get_job(record.id)
    assert stored is not None
    assert stored.meta == {"writer": "current"}


async def test_concurrent_claims_one_wins(store: SqliteStore, tmp_path: Path) -> None:
    # A second store on the same file acts as a second worker process.
    other = SqliteStore(tmp_path / "fence.db", synchronous="normal")
    await other.open()
    try:
        for _ in range(10):
            record = job_record(due_in_s=-1)
            await insert(store, record)

            handles = await asyncio.gather(
                claim(store, record, owner="worker-a", lease_s=30),
                claim(other, record, owner="worker-b", lease_s=30),
            )

            winners = [handle for handle in handles if handle is not None]
            assert len(winners) == 1
            stored = await store.get_job(record.id)
            assert stored is not None
            assert stored.owner == winners[0].record.owner
            assert stored.fence == record.fence + 1
    finally:
        await other.close()


async def test_claim_skips_job_not_due(store: SqliteStore) -> None:
    record = job_record(due_in_s=60)
    await insert(store, record)

    handle = await claim(store, record, owner="worker-a", lease_s=30)

    assert handle is None


async def test_expired_lease_claimed_by_sweeper(worker: RunningWorker, events: Captured) -> None:
    workflow = await worker.put_workflow(
        {"id": "lease", "steps": [result_step("a"), result_step("b")]}
    )
    long_ago = utc_now() - timedelta(minutes=5)
    done_a = Intent(
        id=new_id(),
        step_id="a",
        action="test.result",
        events=[
            Event(index=0, status=Status.RUN, at=long_ago),
            Event(index=1, status=Status.OK, at=long_ago),
        ],
        completed=True,
        created_at=long_ago,
        updated_at=long_ago,
    )
    record = job_record(
        created_at=long_ago,
        due_in_s=1,
        workflow_id="lease",
        workflow_version=workflow.version,
        owner="worker-gone",
        fence=3,
        status=Status.OK,
        intents=[done_a],
        meta={"origin": "test"},
    )
    await insert(worker.store, record)

    await events.wait_for(
        lambda m: m.type == "job.completed" and m.headers["x-job-id"] == record.id
    )

    stored = await worker.store.get_job(record.id)
    assert stored is not None
    assert stored.completed_at is not None
    assert stored.fence == 4
    assert stored.owner is None
    assert step_ids(stored.intents) == ["a", "b"]
    assert calls(record.id, "a") == 0
    assert calls(record.id, "b") == 1


async def test_handle_reload_checks_fence(store: SqliteStore) -> None:
    record = job_record(due_in_s=-1)
    await insert(store, record)
    stale = await claim(store, record, owner="worker-a", lease_s=0)
    assert stale is not None
    fresh_record = await store.get_job(record.id)
    assert fresh_record is not None
    assert await claim(store, fresh_record, owner="worker-b", lease_s=30) is not None

    with pytest.raises(FencedOut):
        await stale.refresh()
