"""The publisher client: the README example, the synchronous helpers, reconnects."""

from __future__ import annotations

import asyncio
import re
import runpy
import subprocess
from pathlib import Path

import pytest

from contracts.client import (
    CommandNotRouted,
    JobRejected,
    JobsClient,
    ReplyTimeout,
    create_job_sync,
    get_job_sync,
)
from tests.conftest import AMQP_URL, RunningWorker
from tests.factories import load_envelope

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "client.py"

WORKFLOW = {
    "id": "invoice",
    "steps": [
        {"action": "sequence.enumerate", "config": {"name": "inv", "prefix": "EX-"}},
        {"action": "silo.close"},
    ],
}


def test_readme_shows_the_example() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)

    assert EXAMPLE.read_text(encoding="utf-8") in blocks


async def test_example_submits_an_invoice(
    worker: RunningWorker, capsys: pytest.CaptureFixture[str]
) -> None:
    await worker.put_workflow(WORKFLOW)
    submit = runpy.run_path(str(EXAMPLE))["submit"]

    status = await submit(load_envelope(), AMQP_URL, worker.settings.amqp_namespace)
    printed = capsys.readouterr().out

    assert status == 0
    assert "code EX-1, 1 signature(s), found again: True" in printed


async def test_sync_helpers_from_a_thread(worker: RunningWorker) -> None:
    await worker.put_workflow(WORKFLOW)
    namespace = worker.settings.amqp_namespace

    # The helpers run their own event loop, so a script calls them outside one.
    job = await asyncio.to_thread(
        create_job_sync,
        {"workflow_id": "invoice", "key": "sync-1", "data": load_envelope()},
        url=AMQP_URL,
        namespace=namespace,
        wait=10,
    )
    found = await asyncio.to_thread(get_job_sync, key="sync-1", url=AMQP_URL, namespace=namespace)

    assert job.completed_at is not None
    assert found.id == job.id


async def test_sync_helper_raises_rejection(worker: RunningWorker) -> None:
    with pytest.raises(JobRejected) as rejected:
        await asyncio.to_thread(
            create_job_sync,
            {"workflow_id": "missing", "meta": {}},
            url=AMQP_URL,
            namespace=worker.settings.amqp_namespace,
        )

    assert rejected.value.status == 404


async def test_timeout_while_worker_stopped(worker: RunningWorker) -> None:
    await worker.stop()
    namespace = worker.settings.amqp_namespace

    async with JobsClient(AMQP_URL, namespace=namespace, timeout_s=0.3) as client:
        with pytest.raises(ReplyTimeout) as timed_out:
            await client.get_job(id="01a242ed-823c-7143-a45f-1b5bbf4ad7a7")

    assert "is a worker running?" in str(timed_out.value)


async def test_missing_topology_is_explained(broker: str) -> None:
    client = JobsClient(AMQP_URL, namespace="no-worker-ever-ran-here")

    with pytest.raises(CommandNotRouted) as missing:
        await client.connect()

    assert "no-worker-ever-ran-here.commands does not exist" in str(missing.value)


async def test_reply_queue_survives_reconnect(worker: RunningWorker, client: JobsClient) -> None:
    await worker.put_workflow(WORKFLOW)
    queue = client.reply_queue

    # The broker drops the client's connection; the robust connection comes back.
    pid = await _connection_pid(client)
    closed = await asyncio.to_thread(
        subprocess.run,
        ["rabbitmqctl", "close_connection", pid, "test reconnect"],
        capture_output=True,
        check=False,
    )
    assert closed.returncode == 0, closed.stderr
    job = await client.create_job({"workflow_id": "invoice", "data": load_envelope()}, wait=10)

    assert client.reply_queue == queue
    assert job.completed_at is not None


async def _connection_pid(client: JobsClient) -> str:
    """Return the broker's pid of the client's connection, found by its name."""
    listing = await asyncio.to_thread(
        subprocess.run,
        ["rabbitmqctl", "list_connections", "pid", "client_properties", "--quiet"],
        capture_output=True,
        text=True,
        check=True,
    )
    for line in listing.stdout.splitlines():
        if client.connection_name in line:
            return line.split()[0]
    raise AssertionError(f"no connection named {client.connection_name!r}")


async def test_timeout_names_job_for_retry(worker: RunningWorker) -> None:
    await worker.put_workflow(WORKFLOW)
    await worker.stop()
    namespace = worker.settings.amqp_namespace
    command = {"workflow_id": "invoice", "data": load_envelope()}

    async with JobsClient(AMQP_URL, namespace=namespace, timeout_s=0.3) as client:
        with pytest.raises(ReplyTimeout) as timed_out:
            await client.create_job(command)

    assert timed_out.value.job_id is not None
    assert "id" not in command
