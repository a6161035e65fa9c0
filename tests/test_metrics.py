"""The metrics endpoint and the health probes, scraped over HTTP."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from contracts.client import JobsClient
from tests.conftest import RawCommands, RunningWorker, WorkerFactory, fast_settings
from tests.factories import load_envelope
from worker.errors import StoreUnavailable
from worker.service import Worker

WORKFLOW = {
    "id": "metered",
    "steps": [
        {"id": "state", "action": "silo.state", "config": {"state": "processing"}},
        {"id": "close", "action": "silo.close"},
    ],
}


async def get(worker: Worker, path: str) -> httpx.Response:
    assert worker.metrics_port is not None
    async with httpx.AsyncClient() as http:
        return await http.get(f"http://127.0.0.1:{worker.metrics_port}{path}", timeout=5)


def sample(text: str, name: str, **labels: str) -> float:
    """Return the value of one sample of the Prometheus text, or 0 when it is absent."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    prefix = f"{name}{{{wanted}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.removeprefix(prefix))
    return 0.0


async def test_job_counted_by_workflow(worker: RunningWorker, client: JobsClient) -> None:
    await worker.put_workflow(WORKFLOW)

    job = await client.create_job({"workflow_id": "metered", "data": load_envelope()}, wait=10)
    text = (await get(worker.worker, "/metrics")).text

    assert job.completed_at is not None
    assert sample(text, "transform_jobs_accepted_total", workflow_id="metered") == 1
    assert sample(text, "transform_jobs_completed_total", workflow_id="metered") == 1
    assert sample(text, "transform_jobs_failed_total", workflow_id="metered") == 0
    count = "transform_step_duration_seconds_count"
    assert sample(text, count, action="silo.state", status="OK") == 1
    assert sample(text, count, action="silo.close", status="OK") == 1
    assert sample(text, "transform_consumer_connected") == 1


async def test_in_flight_returns_to_zero(worker: RunningWorker, client: JobsClient) -> None:
    await worker.put_workflow(WORKFLOW)
    await client.create_job({"workflow_id": "metered", "data": load_envelope()}, wait=10)

    # The reply leaves before the job's task ends, so the gauge may still read 1 briefly.
    for _ in range(100):
        text = (await get(worker.worker, "/metrics")).text
        if sample(text, "transform_jobs_in_flight") == 0:
            break
        await asyncio.sleep(0.02)

    assert sample(text, "transform_jobs_in_flight") == 0


async def test_rejection_counted_by_key(worker: RunningWorker, raw: RawCommands) -> None:
    reply = await raw.send(b"not json")
    text = (await get(worker.worker, "/metrics")).text

    assert reply.type == "job.rejected"
    assert sample(text, "transform_commands_rejected_total", key="invalid_json", status="400") == 1


async def test_undeliverable_reply_counted(worker: RunningWorker, raw: RawCommands) -> None:
    await worker.put_workflow(WORKFLOW)
    body = {"workflow_id": "metered", "data": load_envelope()}
    await raw.publish(body, reply_to="no-such-queue-for-metrics")

    async def undeliverable() -> float:
        text = (await get(worker.worker, "/metrics")).text
        return sample(text, "transform_replies_undeliverable_total")

    for _ in range(100):
        if await undeliverable() == 1:
            break
        await asyncio.sleep(0.05)
    assert await undeliverable() == 1


async def test_health_and_ready(worker: RunningWorker) -> None:
    health = await get(worker.worker, "/healthz")
    ready = await get(worker.worker, "/readyz")
    missing = await get(worker.worker, "/nope")

    assert health.status_code == 200
    assert ready.status_code == 200
    assert missing.status_code == 404


async def test_not_ready_when_store_fails(
    worker: RunningWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken_ping() -> None:
        raise StoreUnavailable("SQLite: disk I/O error")

    monkeypatch.setattr(worker.store, "ping", broken_ping)

    ready = await get(worker.worker, "/readyz")

    assert ready.status_code == 503
    assert "disk I/O error" in ready.text


async def test_not_ready_while_store_is_missing(
    start_worker: WorkerFactory, tmp_path: Path
) -> None:
    # The database's folder cannot be created: a plain file is where it would go.
    blocked = tmp_path / "blocked"
    blocked.write_text("not a folder")
    settings = fast_settings(tmp_path, store_url=f"sqlite:///{blocked / 'sub' / 'x.db'}")
    worker = Worker(settings)
    task = asyncio.create_task(worker.run())
    try:
        for _ in range(100):
            if worker.metrics_port is not None:
                break
            await asyncio.sleep(0.02)
        health = await get(worker, "/healthz")
        ready = await get(worker, "/readyz")
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 10)

    assert health.status_code == 200
    assert ready.status_code == 503
    assert "store is not open" in ready.text


async def test_prometheus_format_parses(worker: RunningWorker) -> None:
    text = (await get(worker.worker, "/metrics")).text
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}

    assert {
        "transform_jobs_accepted_total",
        "transform_jobs_completed_total",
        "transform_jobs_failed_total",
        "transform_commands_rejected_total",
        "transform_step_duration_seconds",
        "transform_retries_scheduled_total",
        "transform_replies_undeliverable_total",
        "transform_jobs_in_flight",
        "transform_consumer_connected",
    } <= names


async def test_undeliverable_rejection_counted(worker: RunningWorker, raw: RawCommands) -> None:
    await raw.publish(b"not json", reply_to="no-such-queue-for-rejections")

    for _ in range(100):
        text = (await get(worker.worker, "/metrics")).text
        if sample(text, "transform_replies_undeliverable_total") == 1:
            break
        await asyncio.sleep(0.05)

    assert sample(text, "transform_replies_undeliverable_total") == 1
