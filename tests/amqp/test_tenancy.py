"""Workspaces bound to broker users: two real RabbitMQ users, one workspace each."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import ChannelClosed

from contracts.client import JobRejected, JobsClient
from tests.conftest import RawCommands, RunningWorker, WorkerFactory, fast_settings, reply_json
from tests.factories import load_envelope

NODE = os.environ.get("TRANSFORM_TEST_RABBITMQ_NODE", "rabbit@localhost")

WORKFLOW = {"id": "invoice", "steps": [{"action": "silo.state", "config": {"state": "sent"}}]}


@dataclass(frozen=True)
class BrokerUser:
    name: str
    password: str

    def url(self) -> str:
        return f"amqp://{quote(self.name)}:{quote(self.password)}@127.0.0.1:5672/"


async def rabbitmqctl(*args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-n", NODE, *args, stdout=asyncio.subprocess.DEVNULL
    )
    assert await process.wait() == 0, f"rabbitmqctl {args[0]} failed"


@pytest.fixture(scope="module")
def rabbitmqctl_available() -> Iterator[None]:
    if shutil.which("rabbitmqctl") is None:
        if os.environ.get("CI"):
            pytest.fail("rabbitmqctl is needed to create broker users")
        pytest.skip("rabbitmqctl is not installed")
    yield


@pytest.fixture
async def users(rabbitmqctl_available: None, broker: str) -> AsyncIterator[dict[str, BrokerUser]]:
    made = {
        role: BrokerUser(f"t-{role}-{secrets.token_hex(4)}", secrets.token_hex(12))
        for role in ("alice", "bob")
    }
    for user in made.values():
        await rabbitmqctl("add_user", user.name, user.password)
        await rabbitmqctl("set_permissions", "-p", "/", user.name, ".*", ".*", ".*")
    yield made
    for user in made.values():
        await rabbitmqctl("delete_user", user.name)


@pytest.fixture
async def tenant_worker(
    start_worker: WorkerFactory, tmp_path: Path, users: dict[str, BrokerUser]
) -> RunningWorker:
    mapping = f"{users['alice'].name}=acme,{users['bob'].name}=globex"
    worker = await start_worker(fast_settings(tmp_path, workspace_users=mapping))
    for workspace in ("acme", "globex"):
        await worker.put_workflow({**WORKFLOW, "workspace_id": workspace})
    return worker


def client_for(user: BrokerUser, worker: RunningWorker) -> JobsClient:
    return JobsClient(user.url(), namespace=worker.settings.amqp_namespace, timeout_s=10)


async def test_workspace_comes_from_user(
    tenant_worker: RunningWorker, users: dict[str, BrokerUser]
) -> None:
    async with client_for(users["alice"], tenant_worker) as alice:
        job = await alice.create_job({"workflow_id": "invoice", "meta": {"a": "1"}}, wait=10)

    assert job.workspace_id == "acme"
    assert job.completed_at is not None


async def test_other_workspace_is_forbidden(
    tenant_worker: RunningWorker, users: dict[str, BrokerUser]
) -> None:
    async with client_for(users["alice"], tenant_worker) as alice:
        with pytest.raises(JobRejected) as rejected:
            await alice.create_job(
                {"workflow_id": "invoice", "workspace_id": "globex", "meta": {}}, wait=10
            )

    assert rejected.value.status == 403
    assert rejected.value.error.key == "forbidden"
    assert "may only use workspace acme" in rejected.value.error.message


async def test_jobs_of_other_workspace_not_found(
    tenant_worker: RunningWorker, users: dict[str, BrokerUser]
) -> None:
    async with client_for(users["alice"], tenant_worker) as alice:
        job = await alice.create_job(
            {"workflow_id": "invoice", "key": "inv-1", "data": load_envelope()}, wait=10
        )
    async with client_for(users["bob"], tenant_worker) as bob:
        with pytest.raises(JobRejected) as by_id:
            await bob.get_job(id=job.id)
        with pytest.raises(JobRejected) as by_entry:
            await bob.create_job(
                {"workflow_id": "invoice", "silo_entry_id": job.silo_entry_id}, wait=10
            )
        own = await bob.create_job({"workflow_id": "invoice", "key": "inv-1", "meta": {}}, wait=10)

    assert by_id.value.status == 404
    assert by_entry.value.status == 404
    assert own.workspace_id == "globex"
    assert own.key == "inv-1"


async def test_message_without_user_id_is_forbidden(
    tenant_worker: RunningWorker, amqp: AbstractRobustConnection
) -> None:
    raw = RawCommands(await amqp.channel(), tenant_worker.settings.amqp_namespace)
    await raw.start()

    reply = await raw.send({"workflow_id": "invoice", "meta": {}})

    assert reply.type == "job.rejected"
    assert reply_json(reply)["key"] == "forbidden"


async def test_broker_refuses_impersonation(
    tenant_worker: RunningWorker, users: dict[str, BrokerUser]
) -> None:
    connection = await aio_pika.connect(users["alice"].url())
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(
            f"{tenant_worker.settings.amqp_namespace}.commands", ensure=False
        )
        message = aio_pika.Message(
            b'{"workflow_id": "invoice", "meta": {}}',
            content_type="application/json",
            user_id=users["bob"].name,
        )
        with pytest.raises(ChannelClosed) as closed:
            await exchange.publish(message, "job.create")

    assert "PRECONDITION_FAILED" in str(closed.value)
