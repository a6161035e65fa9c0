"""Building blocks of the chaos tests.

- ``WorkerCluster`` starts ``transform-worker run`` subprocesses that share one
  namespace and one SQLite file, so that SIGKILL and SIGTERM are real, and reads
  their JSON logs and the stored jobs afterwards.
- ``HookServer`` is a webhook endpoint on 127.0.0.1 that records every call with
  its arrival time and responds after a set delay.
- ``Inbox`` collects a durable queue and reconnects by itself, so that replies and
  events published while the broker was disturbed are still counted.
- ``CommandPublisher`` publishes create-job commands with confirms and reports
  whether the broker confirmed each one.
- ``RabbitNode`` runs ``rabbitmqctl`` against the node under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aio_pika
import uuid6
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from tests.conftest import AMQP_URL, delete_topology
from worker.models import JobRecord

#: The RabbitMQ node that serves ``AMQP_URL``; the broker tests stop and restart it.
RABBIT_NODE = os.environ.get("TRANSFORM_TEST_RABBITMQ_NODE", "rabbit@localhost")

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Settings of every worker subprocess unless a test overrides them: short leases and
#: retries, so that a killed worker's jobs resume within seconds.
FAST_WORKER_ENV: dict[str, str] = {
    "TRANSFORM_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
    "TRANSFORM_PREFETCH": "16",
    "TRANSFORM_LEASE_S": "2",
    "TRANSFORM_SWEEP_INTERVAL_S": "0.1",
    "TRANSFORM_OUTBOX_RETRY_S": "1",
    "TRANSFORM_PUBLISH_TIMEOUT_S": "2",
    "TRANSFORM_SHUTDOWN_GRACE_S": "5",
    "TRANSFORM_RETRY_INLINE_ATTEMPTS": "2",
    "TRANSFORM_RETRY_INLINE_INITIAL_S": "0.01",
    "TRANSFORM_RETRY_INLINE_MAX_S": "0.05",
    "TRANSFORM_RETRY_FIRST_S": "0.2",
    "TRANSFORM_RETRY_DOUBLING_MAX_S": "1",
    "TRANSFORM_RETRY_STEADY_S": "1",
    "TRANSFORM_RETRY_TOTAL_S": "120",
    "TRANSFORM_SQLITE_SYNCHRONOUS": "normal",
    "TRANSFORM_WORKFLOW_CACHE_S": "0",
    # Several workers run on one machine: each serves its metrics on a free local port.
    "TRANSFORM_METRICS_HOST": "127.0.0.1",
    "TRANSFORM_METRICS_PORT": "0",
}

T = TypeVar("T")


async def eventually_async(
    check: Callable[[], Awaitable[T]],
    *,
    timeout: float,
    interval: float = 0.5,
    until: Callable[[T], bool] = bool,
) -> T:
    """Await ``check`` until ``until(value)`` is true or ``timeout`` seconds pass.

    Returns the last value either way, so that the caller asserts on what it got.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if until(value) or time.monotonic() >= deadline:
            return value
        await asyncio.sleep(interval)


async def eventually(check: Callable[[], T], *, timeout: float, interval: float = 0.05) -> T:
    """Call ``check`` until it returns a truthy value or ``timeout`` seconds pass.

    Returns the last value either way, so that the caller asserts on what it got.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() >= deadline:
            return value
        await asyncio.sleep(interval)


def settled(jobs: dict[str, JobRecord], expected: Iterable[str]) -> bool:
    """Whether every expected job completed and owes no reply or event any more."""
    for job_id in expected:
        job = jobs.get(job_id)
        if job is None or job.completed_at is None:
            return False
        if any(item.state in ("pending", "sending") for item in job.outbox):
            return False
    return True


def truncate_to_ms(moment: datetime) -> datetime:
    """Drop the sub-millisecond part, as the worker does for every stored time."""
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


# Worker subprocesses


def read_log(path: Path) -> list[dict[str, Any]]:
    """Parse a JSON-lines log; lines that are not JSON objects are skipped.

    A worker killed with SIGKILL can leave half a line at the end of its log.
    """
    if not path.exists():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            entry = json.loads(line)
            if isinstance(entry, dict):
                entries.append(entry)
    return entries


@dataclass
class WorkerProcess:
    """One ``transform-worker run`` subprocess and the files its output goes to."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def logs(self) -> list[dict[str, Any]]:
        return read_log(self.log_path)

    def events(self, event: str) -> list[dict[str, Any]]:
        """Return the log entries whose ``event`` is ``event``."""
        return [entry for entry in self.logs() if entry.get("event") == event]

    def send(self, signum: signal.Signals) -> None:
        if self.alive:
            self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL the process and reap it."""
        if self.alive:
            self.process.kill()
        self.process.wait()

    async def wait_exit(self, timeout: float) -> int | None:
        """Wait for the process to end; return its exit status, or None if it did not."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            return await asyncio.to_thread(self.process.wait, timeout)
        return None

    async def wait_for_event(
        self,
        event: str,
        *,
        timeout: float,
        where: Callable[[dict[str, Any]], bool] = lambda _: True,
    ) -> dict[str, Any]:
        """Wait until the log has an entry ``event`` that matches ``where``; return it."""

        def find() -> dict[str, Any] | None:
            return next((e for e in self.events(event) if where(e)), None)

        found = await eventually(find, timeout=timeout)
        if found is None:
            raise AssertionError(
                f"{self.name} logged no {event} within {timeout:g} s "
                f"(alive: {self.alive}); log tail:\n{self.tail()}"
            )
        return found

    async def wait_started(self, timeout: float = 30) -> None:
        """Wait for ``worker.started``; fail at once with the log if the process ends."""

        def started() -> bool:
            return bool(self.events("worker.started")) or not self.alive

        await eventually(started, timeout=timeout)
        if not self.events("worker.started"):
            raise AssertionError(
                f"{self.name} did not start (exit status {self.process.poll()}):\n{self.tail()}"
            )

    def tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        errors = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        return "\n".join([*text.splitlines()[-lines:], *errors.splitlines()[-lines:]])


class WorkerCluster:
    """Worker subprocesses of one test: one namespace, one SQLite file, one data folder.

    Every process started here is killed when the test ends, and the namespace's
    exchanges and queues are deleted.
    """

    def __init__(self, directory: Path, *, amqp_url: str = AMQP_URL) -> None:
        self.directory = directory
        self.amqp_url = amqp_url
        self.namespace = f"chaos{uuid6.uuid7().hex}"
        self.db_path = directory / "transform.db"
        self.log_dir = directory / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = self._environment(amqp_url)
        self.processes: list[WorkerProcess] = []
        self.inboxes: list[Inbox] = []

    def _environment(self, amqp_url: str) -> dict[str, str]:
        # Settings of the test run itself must not leak into the workers.
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFORM_")}
        env.update(FAST_WORKER_ENV)
        env.update(
            {
                "TRANSFORM_AMQP_URL": amqp_url,
                "TRANSFORM_AMQP_NAMESPACE": self.namespace,
                "TRANSFORM_STORE_URL": f"sqlite:///{self.db_path}",
                "TRANSFORM_DATA_DIR": str(self.directory / "data"),
                "TRANSFORM_LOG_FORMAT": "json",
                # A line printed just before a SIGKILL must reach the log file.
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def exchange(self, suffix: str) -> str:
        return f"{self.namespace}.{suffix}"

    def start(self, name: str = "worker", **settings: str) -> WorkerProcess:
        """Start a worker subprocess; ``settings`` override the cluster's for this one."""
        number = sum(1 for p in self.processes if p.name.startswith(f"{name}#")) + 1
        label = f"{name}#{number}"
        env = dict(self.env)
        env.update({f"TRANSFORM_{key.upper()}": value for key, value in settings.items()})
        log_path = self.log_dir / f"{name}-{number}.log"
        stderr_path = self.log_dir / f"{name}-{number}.err"
        with log_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "worker.cli", "run"],
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
            )
        worker = WorkerProcess(label, process, log_path, stderr_path)
        self.processes.append(worker)
        return worker

    async def start_ready(self, name: str = "worker", **settings: str) -> WorkerProcess:
        worker = self.start(name, **settings)
        await worker.wait_started()
        return worker

    async def put_workflows(self, *definitions: dict[str, Any]) -> None:
        """Store workflows with ``transform-worker workflows put``, as an operator would."""
        files = []
        for definition in definitions:
            path = self.directory / f"workflow-{definition['id']}.json"
            path.write_text(json.dumps(definition), encoding="utf-8")
            files.append(str(path))
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "worker.cli", "workflows", "put", *files],
            cwd=REPO_ROOT,
            env=self.env,
            capture_output=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr.decode(errors="replace")

    async def inbox(self, suffix: str, *, bind_to: str | None = None) -> Inbox:
        """Start collecting the durable queue ``<namespace>.<suffix>``.

        With ``bind_to``, an exchange suffix such as ``events``, the queue is bound to
        that exchange of the namespace with ``#``. Without it, it is a reply queue.
        """
        exchange = self.exchange(bind_to) if bind_to is not None else None
        inbox = Inbox(self.amqp_url, self.exchange(suffix), bind_to=exchange)
        self.inboxes.append(inbox)
        await inbox.start()
        return inbox

    def publisher(self) -> CommandPublisher:
        return CommandPublisher(self.amqp_url, self.namespace)

    def logs(self) -> list[dict[str, Any]]:
        """Every log entry of every process started so far, process by process."""
        return [entry for worker in self.processes for entry in worker.logs()]

    def events(self, event: str) -> list[dict[str, Any]]:
        return [entry for entry in self.logs() if entry.get("event") == event]

    def jobs(self) -> dict[str, JobRecord]:
        """Read every stored job from the SQLite file, through a read-only connection."""
        if not self.db_path.exists():
            return {}
        connection = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30)
        try:
            rows = connection.execute("SELECT doc FROM jobs").fetchall()
        finally:
            connection.close()
        jobs = [JobRecord.model_validate_json(row[0]) for row in rows]
        return {job.id: job for job in jobs}

    async def wait_settled(self, expected: set[str], *, timeout: float) -> dict[str, JobRecord]:
        """Wait until every expected job completed and owes nothing; return the stored jobs.

        Returns the jobs as they are when ``timeout`` passes too, for the assertions.
        """

        def settled_jobs() -> dict[str, JobRecord] | None:
            found = self.jobs()
            return found if settled(found, expected) else None

        return await eventually(settled_jobs, timeout=timeout, interval=0.5) or self.jobs()

    async def close(self) -> None:
        """Kill every worker, stop every inbox and delete the namespace's queues."""
        for worker in self.processes:
            worker.kill()
        for inbox in self.inboxes:
            await inbox.close()
        await delete_topology({self.namespace})
        if self.inboxes:
            connection = await aio_pika.connect(self.amqp_url)
            async with connection:
                channel = await connection.channel()
                for inbox in self.inboxes:
                    await channel.queue_delete(inbox.name)


# The webhook endpoint


@dataclass
class Call:
    """One POST the hook server received."""

    path: str
    body: dict[str, Any]
    arrived_at: datetime
    #: Set once the server has written its response.
    answered: threading.Event = field(default_factory=threading.Event)

    @property
    def job_id(self) -> str | None:
        value = self.body.get("job_id")
        return value if isinstance(value, str) else None


@dataclass
class Route:
    status: int
    delay_s: Callable[[], float]


class HookServer:
    """An HTTP server on 127.0.0.1 whose routes respond with a fixed status after a delay."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.calls: list[Call] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                arrived_at = datetime.now(UTC)
                length = int(self.headers.get("content-length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                call = Call(self.path, body, arrived_at)
                with server.lock:
                    server.calls.append(call)
                route = server.routes[self.path]
                time.sleep(route.delay_s())
                # The worker may have died or hung up meanwhile.
                with contextlib.suppress(OSError):
                    self.send_response(route.status)
                    self.send_header("content-length", "0")
                    self.end_headers()
                call.answered.set()

            def log_message(self, format: str, *args: Any) -> None:
                return

        return Handler

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def route(
        self, path: str, *, status: int = 200, delay_s: float | Callable[[], float] = 0.0
    ) -> str:
        """Add a route and return its URL; ``delay_s`` may be a function for random delays."""
        delay = delay_s if callable(delay_s) else (lambda: float(delay_s))
        self.routes[path] = Route(status, delay)
        return f"http://127.0.0.1:{self.port}{path}"

    def calls_to(self, path: str) -> list[Call]:
        with self.lock:
            return [call for call in self.calls if call.path == path]

    def calls_by_job(self, path: str) -> dict[str, list[Call]]:
        by_job: dict[str, list[Call]] = {}
        for call in self.calls_to(path):
            by_job.setdefault(call.job_id or "", []).append(call)
        return by_job


# The broker side of a test


@dataclass(frozen=True)
class Received:
    """What the tests need of one message taken from an inbox."""

    message_id: str | None
    correlation_id: str | None
    type: str | None
    headers: dict[str, Any]
    body: bytes

    @property
    def job_id(self) -> str | None:
        value = self.headers.get("x-job-id")
        return value if isinstance(value, str) else None


class Inbox:
    """A durable queue and a consumer of it that reconnects whenever its connection ends.

    Messages are acknowledged once recorded. A message whose acknowledgement was lost
    with the connection comes back flagged ``redelivered``, and it is dropped when a
    message with its ``message_id`` was recorded already. So every message counted
    was published by the worker, the worker's own copies included.
    """

    def __init__(self, url: str, name: str, *, bind_to: str | None = None) -> None:
        self.url = url
        self.name = name
        self.bind_to = bind_to
        self.messages: list[Received] = []
        self.arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Declare the queue (bound to ``bind_to`` with ``#``) and start consuming."""
        connection = await aio_pika.connect(self.url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(self.name, durable=True)
            if self.bind_to is not None:
                await queue.bind(self.bind_to, "#")
        self._task = asyncio.create_task(self._consume_forever(), name=f"inbox {self.name}")

    async def _consume_forever(self) -> None:
        while True:
            closed = asyncio.Event()
            connection: AbstractConnection | None = None
            try:
                connection = await aio_pika.connect(self.url, timeout=5)
                connection.close_callbacks.add(lambda *_, done=closed: done.set())
                channel = await connection.channel()
                await channel.set_qos(prefetch_count=500)
                queue = await channel.get_queue(self.name, ensure=False)
                await queue.consume(self._on_message)
                await closed.wait()
            except (*CONNECTION_EXCEPTIONS, TimeoutError):
                # The broker is down or closed the connection: connect again shortly.
                pass
            finally:
                if connection is not None and not connection.is_closed:
                    with contextlib.suppress(*CONNECTION_EXCEPTIONS, TimeoutError):
                        await asyncio.wait_for(connection.close(), 5)
            await asyncio.sleep(0.3)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        seen = any(m.message_id == message.message_id for m in self.messages)
        if not (message.redelivered and seen):
            self.messages.append(
                Received(
                    message.message_id,
                    message.correlation_id,
                    message.type,
                    dict(message.headers or {}),
                    message.body,
                )
            )
            self.arrived.set()
        with contextlib.suppress(*CONNECTION_EXCEPTIONS):
            await message.ack()

    async def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float) -> bool:
        """Wait until ``predicate(messages)`` holds; return whether it did in time."""

        async def watch() -> None:
            while not predicate(self.messages):
                self.arrived.clear()
                await self.arrived.wait()

        try:
            await asyncio.wait_for(watch(), timeout)
        except TimeoutError:
            return False
        return True

    def by_correlation_id(self) -> dict[str, list[Received]]:
        grouped: dict[str, list[Received]] = {}
        for message in self.messages:
            grouped.setdefault(message.correlation_id or "", []).append(message)
        return grouped

    async def close(self) -> None:
        """Stop consuming; ``WorkerCluster.close`` deletes the queue."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class CommandPublisher:
    """Publishes ``job.create`` commands with publisher confirms, reconnecting on failure."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url = url
        self.exchange_name = f"{namespace}.commands"
        self._connection: AbstractConnection | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None

    async def _ensure_exchange(self) -> aio_pika.abc.AbstractExchange:
        if self._exchange is None:
            self._connection = await aio_pika.connect(self.url, timeout=5)
            channel = await self._connection.channel(publisher_confirms=True)
            self._exchange = await channel.get_exchange(self.exchange_name, ensure=False)
        return self._exchange

    async def create(
        self,
        body: dict[str, Any],
        *,
        reply_to: str | None,
        correlation_id: str | None = None,
        timeout_s: float = 5.0,
    ) -> bool:
        """Publish one command; return True once the broker confirmed it.

        The AMQP ``message_id`` is the body's ``id``. False means the broker did not
        confirm in time or the connection failed; the command may still have arrived.
        """
        message = aio_pika.Message(
            json.dumps(body).encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=body.get("id"),
            correlation_id=correlation_id,
            reply_to=reply_to,
        )
        try:
            async with asyncio.timeout(timeout_s):
                exchange = await self._ensure_exchange()
                await exchange.publish(message, "job.create")
        except (*CONNECTION_EXCEPTIONS, TimeoutError):
            await self.close()
            return False
        return True

    async def close(self) -> None:
        connection, self._connection, self._exchange = self._connection, None, None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(*CONNECTION_EXCEPTIONS, TimeoutError):
                await asyncio.wait_for(connection.close(), 5)


async def ready_messages(url: str, queue: str) -> int:
    """Return the messages of a queue that wait for a consumer, as the broker counts now."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        result = declared.declaration_result
        return int(result.message_count or 0)


class FreezableProxy:
    """A TCP proxy on 127.0.0.1 that can hold back every byte, in both directions.

    While frozen, connections stay open but nothing passes, as with a broker that
    hangs or a network that drops packets without resetting connections. Thawing
    forwards what was held, in order.
    """

    def __init__(self, target_url: str) -> None:
        parts = urlsplit(target_url)
        self.target_url = target_url
        self.target = (parts.hostname or "127.0.0.1", parts.port or 5672)
        self.port = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        """The target URL with the proxy's address in place of the broker's."""
        parts = urlsplit(self.target_url)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{credentials}@127.0.0.1:{self.port}" if credentials else f"127.0.0.1:{self.port}"
        return parts._replace(netloc=netloc).geturl()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers += [writer, upstream_writer]
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            pump = asyncio.create_task(self._pump(source, sink))
            self._pumps.add(pump)
            pump.add_done_callback(self._pumps.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A reset on either side ends this direction, and closing its writer passes it on.
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        writer.close()

    async def close(self) -> None:
        self._flowing.set()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        for writer in self._writers:
            writer.close()


def new_job_id() -> str:
    return str(uuid6.uuid7())


# The broker's command line


class RabbitNode:
    """``rabbitmqctl -n NODE`` for the node that serves the test broker."""

    def __init__(self, name: str, amqp_url: str) -> None:
        self.name = name
        self.amqp_port = urlsplit(amqp_url).port or 5672
        self.ctl = shutil.which("rabbitmqctl") or "rabbitmqctl"

    async def run(self, *args: str, timeout: float = 60) -> str:
        """Run one ``rabbitmqctl`` command on the node; return its output."""
        process = await asyncio.create_subprocess_exec(
            self.ctl,
            "-n",
            self.name,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        if process.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl -n {self.name} {' '.join(args)} failed with status "
                f"{process.returncode}: {stderr.decode(errors='replace').strip()}"
            )
        return stdout.decode()

    def amqp_ports(self) -> set[int]:
        """Return the AMQP ports the node listens on (a blocking call, for fixtures)."""
        result = subprocess.run(
            [self.ctl, "-n", self.name, "status", "--formatter", "json"],
            capture_output=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(result.stderr.decode(errors="replace").strip())
        status = json.loads(result.stdout)
        return {
            int(listener["port"])
            for listener in status.get("listeners", [])
            if listener.get("protocol") == "amqp"
        }

    async def close_all_connections(self) -> None:
        await self.run("close_all_connections", "chaos test")

    async def stop_app(self) -> None:
        await self.run("stop_app")

    async def start_app(self) -> None:
        await self.run("start_app")
        await self.run("await_startup")

    async def heartbeats(self, name_contains: str) -> list[int]:
        """Return the negotiated heartbeat (s) of connections whose name contains the text."""
        rows = json.loads(
            await self.run(
                "list_connections", "timeout", "client_properties", "--formatter", "json"
            )
        )
        timeouts = []
        for row in rows:
            properties = {item[0]: item[2] for item in row["client_properties"]}
            if name_contains in str(properties.get("connection_name", "")):
                timeouts.append(int(row["timeout"]))
        return timeouts

    async def queue_messages(self, queue: str) -> int:
        """Return the messages of a queue, ready and unacknowledged together.

        NOTE: for a quorum queue the figure dates from the node's last statistics tick,
        so it can lag by about 5 s (seen on RabbitMQ 3.10). Poll it, do not read it once.
        """
        rows = json.loads(await self.run("list_queues", "name", "messages", "--formatter", "json"))
        for row in rows:
            if row["name"] == queue:
                return int(row["messages"])
        raise AssertionError(f"queue {queue} not found on {self.name}")
