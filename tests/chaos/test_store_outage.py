"""Store outages: a locked SQLite file, and MongoDB on a port where nothing listens.

The promise: no command is acknowledged before its job is durable, the worker logs
``store.unavailable`` and backs off, and every job completes once the store is back.
A store that cannot be reached raises ``StoreUnavailable`` within a bounded time,
and a worker that starts without its store retries visibly instead of dying.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from contracts.timestamps import utc_now
from tests.chaos.helpers import (
    RabbitNode,
    WorkerCluster,
    eventually,
    eventually_async,
    new_job_id,
)
from tests.factories import entry_record, job_record, load_envelope, new_id, workflow_record
from worker.errors import StoreUnavailable
from worker.store.base import StoredFile
from worker.store.mongo import MongoStore

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(120)]

JOBS = 10
DEAD_MONGO_URL = "mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=500"
#: Maximum time a store call may take against the dead server: the 0.5 s server selection
#: timeout plus room for a slow machine. A call still running then counts as hung.
STORE_CALL_DEADLINE_S = 10.0

#: Holds ``BEGIN EXCLUSIVE`` on the database given as argument until a line arrives on
#: stdin. It prints ``locked`` once it holds the lock and ``released`` after.
LOCK_HOLDER = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
connection.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
connection.execute("COMMIT")
print("released", flush=True)
"""

STATE_WORKFLOW = {
    "id": "state",
    "steps": [
        {"id": "processing", "action": "silo.state", "config": {"state": "processing"}},
        {"id": "sent", "action": "silo.state", "config": {"state": "sent"}},
    ],
}


class LockHolder:
    """Another process that holds a SQLite file's write lock until ``release()``."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.released_at: float | None = None

    async def release(self) -> None:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(b"release\n")
        await self.process.stdin.drain()
        line = await asyncio.wait_for(self.process.stdout.readline(), 30)
        assert line.strip() == b"released"
        self.released_at = time.monotonic()
        await self.process.wait()


@asynccontextmanager
async def exclusive_lock(path: Path) -> AsyncIterator[LockHolder]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        LOCK_HOLDER,
        str(path),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert line.strip() == b"locked"
        yield LockHolder(process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_sqlite_lock_holds_ack(cluster: WorkerCluster, rabbit_node: RabbitNode) -> None:
    await cluster.put_workflows(STATE_WORKFLOW)
    # A short busy timeout, so that the lock shows as store.unavailable within a second.
    worker = await cluster.start_ready(sqlite_busy_timeout_s="1")
    replies = await cluster.inbox("test-replies")
    publisher = cluster.publisher()
    envelope = load_envelope()
    job_ids = [new_job_id() for _ in range(JOBS)]

    async with exclusive_lock(cluster.db_path) as lock:
        locked_at = time.monotonic()

        # When: commands arrive while another process holds the database's write lock.
        for job_id in job_ids:
            body = {"id": job_id, "workflow_id": "state", "data": envelope}
            assert await publisher.create(body, reply_to=replies.name, correlation_id=job_id)
        await publisher.close()
        unavailable = await worker.wait_for_event("store.unavailable", timeout=30)
        waited_s = time.monotonic() - locked_at

        # Then: none of them is acknowledged or stored while the lock lasts.
        # The broker's figure lags behind by a few seconds, so read it until it is current.
        queued = await eventually_async(
            lambda: rabbit_node.queue_messages(cluster.exchange("jobs")),
            timeout=15,
            until=lambda count: count == JOBS,
        )
        stored_while_locked = len(cluster.jobs())
        await lock.release()

    jobs = await cluster.wait_settled(set(job_ids), timeout=60)
    await replies.wait_for(lambda got: set(job_ids) <= {m.correlation_id for m in got}, 30)
    unfinished = sorted(j for j in job_ids if j not in jobs or jobs[j].completed_at is None)
    without_reply = sorted(set(job_ids) - set(replies.by_correlation_id()))
    print(
        f"\nsqlite lock: store.unavailable after {waited_s:.1f} s ({unavailable.get('error')!r}); "
        f"{queued} of {JOBS} commands still queued and {stored_while_locked} jobs stored "
        f"while locked; {JOBS - len(unfinished)} of {JOBS} completed after the release"
    )
    assert queued == JOBS
    assert stored_while_locked == 0
    assert unfinished == []
    assert without_reply == []
    assert worker.alive


StoreCall = Callable[[MongoStore], Awaitable[Any]]

#: One call of every ``Store`` method, with arguments that never reach the dead server.
STORE_CALLS: dict[str, StoreCall] = {
    "open": lambda store: store.open(),
    "ping": lambda store: store.ping(),
    "insert_job": lambda store: store.insert_job(job_record(), key_taken_since=utc_now()),
    "get_job": lambda store: store.get_job(new_id()),
    "get_job_by_key": lambda store: store.get_job_by_key("default", "order-1"),
    "replace_job": lambda store: store.replace_job(job_record(), expected_rev=0),
    "due_jobs": lambda store: store.due_jobs(utc_now(), 10),
    "due_outboxes": lambda store: store.due_outboxes(utc_now(), 10),
    "insert_entry": lambda store: store.insert_entry(entry_record()),
    "get_entry": lambda store: store.get_entry("default", new_id()),
    "replace_entry": lambda store: store.replace_entry(entry_record(), expected_rev=0),
    "put_workflow": lambda store: store.put_workflow(workflow_record()),
    "get_workflow": lambda store: store.get_workflow("default", "invoice"),
    "list_workflows": lambda store: store.list_workflows("default"),
    "assign_number": lambda store: store.assign_number("default", "invoices", new_id(), start=1),
    "put_file": lambda store: store.put_file(
        StoredFile("default", new_id(), "a.pdf", "application/pdf", b"%PDF-1.7")
    ),
    "get_file": lambda store: store.get_file("default", new_id()),
}


@pytest.mark.parametrize("method", sorted(STORE_CALLS))
async def test_mongo_dead_port_raises(method: str) -> None:
    store = MongoStore.from_url(DEAD_MONGO_URL)
    try:
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(STORE_CALLS[method](store), STORE_CALL_DEADLINE_S)
    finally:
        await store.close()


async def test_mongo_dead_port_worker_retries(cluster: WorkerCluster) -> None:
    secret = "s3cret-password"
    url = DEAD_MONGO_URL.replace("mongodb://", f"mongodb://chaos:{secret}@")
    worker = cluster.start(store_url=url)

    # The worker cannot open its store, so it must log that and keep trying, not exit.
    def store_retries() -> list[dict[str, Any]]:
        entries = worker.events("worker.start_retrying")
        return [entry for entry in entries if entry.get("component") == "store"]

    await eventually(lambda: len(store_retries()) >= 3 or not worker.alive, timeout=30)
    retries = store_retries()
    alive_while_retrying = worker.alive
    worker.send(signal.SIGTERM)
    status = await worker.wait_exit(timeout=15)
    logged = worker.log_path.read_text(errors="replace")
    print(
        f"\ndead MongoDB: {len(retries)} worker.start_retrying lines "
        f"(delays {[e.get('delay_s') for e in retries]}), exit status {status} "
        "after SIGTERM"
    )
    assert alive_while_retrying
    assert len(retries) >= 3
    assert all(e.get("level") == "warning" for e in retries)
    assert status == 0
    assert secret not in logged
