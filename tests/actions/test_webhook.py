"""The webhook action against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import structlog

from contracts import Job, Status
from contracts.client import JobsClient
from tests.conftest import AMQP_URL, RunningWorker, WorkerFactory, fast_settings
from tests.factories import load_envelope
from worker.actions.webhook import delivery_id, redact_url
from worker.logs import configure_logging


@dataclass
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class Hook:
    """A scripted HTTP endpoint: answers each POST with the next reply of its plan."""

    plan: list[Reply]
    calls: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_reply(self, request: dict[str, Any]) -> Reply:
        with self.lock:
            self.calls.append(request)
            index = min(len(self.calls) - 1, len(self.plan) - 1)
            return self.plan[index]


class HookServer:
    def __init__(self) -> None:
        self.hooks: dict[str, Hook] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                request = {
                    "path": self.path,
                    "headers": dict(self.headers.items()),
                    "body": json.loads(self.rfile.read(length) or b"null"),
                }
                hook = server.hooks[self.path.split("?")[0]]
                reply = hook.next_reply(request)
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def hook(self, path: str, *plan: Reply) -> str:
        self.hooks[path] = Hook(list(plan))
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def http_server() -> Iterator[HookServer]:
    server = HookServer()
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture
async def hook_worker(start_worker: WorkerFactory, tmp_path: Path) -> RunningWorker:
    return await start_worker(fast_settings(tmp_path, webhook_allow_hosts="127.0.0.1"))


def webhook_workflow(url: str, **config: Any) -> dict[str, Any]:
    return {
        "id": "notify",
        "steps": [
            {"id": "notify", "action": "webhook", "config": {"url": url, **config}},
        ],
        "rescue": [{"id": "mark-error", "action": "silo.state", "config": {"state": "error"}}],
    }


async def run_job(worker: RunningWorker, **command: Any) -> Job:
    async with JobsClient(AMQP_URL, namespace=worker.settings.amqp_namespace) as client:
        return await client.create_job(
            {"workflow_id": "notify", "data": load_envelope(), **command}, wait=20
        )


async def wait_for_job(worker: RunningWorker, job_id: str, predicate: Any) -> Job:
    """Poll the store until the job satisfies ``predicate``; nothing signals a retry wait."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        job = await worker.store.get_job(job_id)
        if job is not None and predicate(job):
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached the expected state")


async def test_server_error_then_ok_retries_in_place(
    hook_worker: RunningWorker, http_server: HookServer
) -> None:
    url = http_server.hook("/flaky", Reply(500), Reply(200))
    await hook_worker.put_workflow(webhook_workflow(url))

    job = await run_job(hook_worker, key="order-1", meta={"order": "1"})

    calls = http_server.hooks["/flaky"].calls
    assert job.status is Status.OK
    assert job.faults == []
    assert [event.status for event in job.intents[0].events] == [
        Status.RUN,
        Status.ERR,
        Status.OK,
    ]
    assert len(calls) == 2
    assert calls[0]["body"] == calls[1]["body"]
    body = calls[1]["body"]
    assert body["id"] == delivery_id(job.id, "notify")
    assert body["job_id"] == job.id
    assert body["silo_entry_id"] == job.silo_entry_id
    assert body["workspace_id"] == "default"
    assert body["key"] == "order-1"
    assert body["meta"] == {"order": "1"}
    assert body["faults"] == []
    assert body["event"] == "job.webhook"


async def test_too_many_requests_waits_retry_after(
    hook_worker: RunningWorker, http_server: HookServer
) -> None:
    url = http_server.hook("/busy", Reply(429, {"Retry-After": "1"}), Reply(204))
    await hook_worker.put_workflow(webhook_workflow(url))
    async with JobsClient(AMQP_URL, namespace=hook_worker.settings.amqp_namespace) as client:
        pending = await client.create_job(
            {"workflow_id": "notify", "data": load_envelope()}, wait=0
        )
        waiting = await wait_for_job(hook_worker, pending.id, lambda j: j.status is Status.ERR)

        assert waiting.completed_at is None
        assert waiting.attempts == 1
        assert waiting.next_attempt_at is not None
        delay = (waiting.next_attempt_at - waiting.updated_at).total_seconds()
        assert 0.9 <= delay <= 1.1

        done = await wait_for_job(hook_worker, pending.id, lambda j: j.completed_at is not None)

    assert done.status is Status.OK
    assert done.attempts == 0
    assert len(http_server.hooks["/busy"].calls) == 2


async def test_not_found_is_ko_with_status_code(
    hook_worker: RunningWorker, http_server: HookServer
) -> None:
    url = http_server.hook("/missing", Reply(404))
    await hook_worker.put_workflow(webhook_workflow(url))

    job = await run_job(hook_worker)

    assert job.faults[0].code == "404"
    assert job.faults[0].action == "webhook"
    assert [intent.step_id for intent in job.intents] == ["notify", "mark-error"]
    assert len(http_server.hooks["/missing"].calls) == 1


async def test_hanging_server_times_out_then_recovers(
    hook_worker: RunningWorker, http_server: HookServer
) -> None:
    url = http_server.hook("/slow", Reply(200, delay_s=1.0), Reply(200, delay_s=1.0), Reply(200))
    await hook_worker.put_workflow(webhook_workflow(url, timeout_s=0.2))

    job = await run_job(hook_worker)

    statuses = [event.status for event in job.intents[0].events]
    assert job.status is Status.OK
    assert Status.ERR in statuses
    assert "timed out" in (job.intents[0].events[1].message or "")
    assert len(http_server.hooks["/slow"].calls) == 3


async def test_host_not_on_allow_list(hook_worker: RunningWorker) -> None:
    await hook_worker.put_workflow(webhook_workflow("http://example.invalid/hook"))

    job = await run_job(hook_worker)

    assert job.faults[0].code == "host-not-allowed"


async def test_token_headers_and_no_credentials_in_logs(
    hook_worker: RunningWorker, http_server: HookServer
) -> None:
    url = http_server.hook("/secure", Reply(500), Reply(200))
    secret_url = url.replace("http://", "http://user:hunter2@") + "?sig=s3cr3t"
    await hook_worker.put_workflow(
        webhook_workflow(secret_url, token="tok-123", headers={"X-Tenant": "acme"})
    )

    with structlog.testing.capture_logs() as logs:
        job = await run_job(hook_worker)

    headers = http_server.hooks["/secure"].calls[0]["headers"]
    assert job.status is Status.OK
    assert headers["Authorization"] == "Bearer tok-123"
    assert headers["X-Tenant"] == "acme"
    logged = json.dumps(logs, default=str)
    recorded = job.model_dump_json()
    for secret in ("hunter2", "s3cr3t", "tok-123"):
        assert secret not in logged
        assert secret not in recorded
    assert redact_url(secret_url) in recorded


async def test_restart_while_waiting_keeps_job(
    start_worker: WorkerFactory, tmp_path: Path, http_server: HookServer
) -> None:
    settings = fast_settings(tmp_path, webhook_allow_hosts="127.0.0.1")
    first = await start_worker(settings)
    url = http_server.hook("/later", Reply(503, {"Retry-After": "2"}), Reply(200))
    await first.put_workflow(webhook_workflow(url))
    async with JobsClient(AMQP_URL, namespace=settings.amqp_namespace) as client:
        pending = await client.create_job(
            {"workflow_id": "notify", "data": load_envelope()}, wait=0
        )
        await wait_for_job(first, pending.id, lambda j: j.status is Status.ERR)
        await first.stop()

        second = await start_worker(settings)
        done = await wait_for_job(second, pending.id, lambda j: j.completed_at is not None)

    assert done.status is Status.OK
    assert len(http_server.hooks["/later"].calls) == 2
    assert done.intents[0].events[-1].status is Status.OK


async def test_library_logs_hide_webhook_url(
    hook_worker: RunningWorker, http_server: HookServer
) -> None:
    # The worker's own logging set-up, as `transform-worker run` has it: structlog and
    # the standard library's loggers (httpx among them) write JSON lines to one stream.
    output = io.StringIO()
    configure_logging("json", "debug", stream=output, cache_loggers=False)
    url = http_server.hook("/quiet", Reply(200)).replace("http://", "http://user:hunter2@")
    await hook_worker.put_workflow(webhook_workflow(url + "?sig=s3cr3t"))
    try:
        job = await run_job(hook_worker)
    finally:
        logging.getLogger().handlers.clear()
        structlog.reset_defaults()
    printed = output.getvalue()

    assert job.status is Status.OK
    assert '"event": "step.finished"' in printed
    assert "hunter2" not in printed
    assert "s3cr3t" not in printed
