"""The three systems under test: how each is set up, started, loaded and removed again.

Every system gets its own namespace (a prefix of every queue and exchange it uses)
and its own temporary folder, so the runs never share broker or database state.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import bare
import processes
import uuid6
from aio_pika.abc import AbstractIncomingMessage
from aiormq.exceptions import AMQPError
from load import Target
from processes import Service

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent

#: The bench workflow: the three steps the Celery task repeats in one function.
WORKFLOW_ID = "bench"
WORKFLOW_YAML = f"""\
id: {WORKFLOW_ID}
name: Bench workflow
description: Marks the entry as processing, numbers the document and signs the envelope.
steps:
  - id: processing
    action: silo.state
    config: {{state: processing}}
  - id: number
    action: sequence.enumerate
    config: {{name: invoices, prefix: "INV-", padding: 5, start: 1}}
  - id: sign
    action: silo.close
"""

#: Prefetch of the bare service, equal to the transform-worker's default TRANSFORM_PREFETCH.
WORKER_PREFETCH = 32

#: How long a started system may take until all its consumers are attached, in seconds.
READY_TIMEOUT_S = 60.0


def load_invoices(folder: Path) -> list[bytes]:
    """Return the compact JSON of every GOBL envelope in ``folder`` whose document is an invoice."""
    envelopes = []
    for path in sorted(folder.glob("*.json")):
        envelope = json.loads(path.read_text(encoding="utf-8"))
        schema = str(envelope.get("doc", {}).get("$schema", ""))
        if envelope.get("$schema", "").endswith("/envelope") and schema.endswith("bill/invoice"):
            envelopes.append(json.dumps(envelope, separators=(",", ":")).encode())
    if not envelopes:
        raise SystemExit(f"no GOBL invoice envelopes found in {folder}")
    return envelopes


@dataclass
class Names:
    """The queues and exchanges a system uses, all starting with its namespace."""

    queues: list[str]
    exchanges: list[str]


class System:
    """One system under test with ``processes`` worker processes."""

    key = "system"
    label = "system"

    def __init__(
        self, processes: int, namespace: str, workdir: Path, url: str, envelopes: list[bytes]
    ) -> None:
        self.processes = processes
        self.namespace = namespace
        self.workdir = workdir
        self.url = url
        self.envelopes = envelopes
        self.services: list[Service] = []

    @property
    def work_queue(self) -> str:
        raise NotImplementedError

    def names(self) -> Names:
        raise NotImplementedError

    def target(self) -> Target:
        raise NotImplementedError

    async def prepare(self) -> None:
        """Create what must exist before the processes start."""

    def commands(self) -> list[tuple[str, list[str], dict[str, str]]]:
        """Return (name, command line, environment) for each process to start."""
        raise NotImplementedError

    async def start(self) -> None:
        await self.prepare()
        for name, command, env in self.commands():
            self.services.append(processes.start(name, command, env, ROOT, self.workdir))
        await wait_for_consumers(self.url, self.work_queue, self.processes, self.services)

    def stop(self) -> list[str]:
        killed = processes.stop(self.services)
        return killed

    def envelope(self, index: int) -> bytes:
        return self.envelopes[index % len(self.envelopes)]


class Bare(System):
    """``bare.py``: consume, reply with a confirm, ack. No job work at all."""

    key = "bare"
    label = "bare aio-pika"

    @property
    def work_queue(self) -> str:
        return f"{self.namespace}.work"

    def names(self) -> Names:
        return Names(queues=[self.work_queue], exchanges=[])

    async def prepare(self) -> None:
        connection = await aio_pika.connect(self.url)
        async with connection:
            channel = await connection.channel()
            await channel.declare_queue(
                self.work_queue, durable=True, arguments=bare.QUEUE_ARGUMENTS
            )

    def commands(self) -> list[tuple[str, list[str], dict[str, str]]]:
        command = [
            sys.executable, str(BENCH_DIR / "bare.py"), "--url", self.url,
            "--queue", self.work_queue, "--prefetch", str(WORKER_PREFETCH),
        ]  # fmt: skip
        return [(f"bare-{n}", command, dict(os.environ)) for n in range(1, self.processes + 1)]

    def target(self) -> Target:
        # The same body as a transform-worker command, so both move the same bytes.
        def build(index: int, correlation_id: str, reply_to: str) -> aio_pika.Message:
            return aio_pika.Message(
                _command_body(str(uuid6.uuid7()), self.envelope(index)),
                content_type="application/json",
                correlation_id=correlation_id,
                reply_to=reply_to,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )

        def check(message: AbstractIncomingMessage) -> str | None:
            return None if message.type == "bare.reply" else f"unexpected reply type {message.type}"

        return Target("", self.work_queue, build, check)


class TransformWorker(System):
    """``transform-worker run`` processes sharing one SQLite file and one namespace."""

    key = "transform-worker"
    label = "transform-worker"

    @property
    def work_queue(self) -> str:
        return f"{self.namespace}.jobs"

    def names(self) -> Names:
        ns = self.namespace
        return Names(
            queues=[f"{ns}.jobs", f"{ns}.dead"],
            exchanges=[f"{ns}.commands", f"{ns}.unrouted", f"{ns}.events", f"{ns}.dead"],
        )

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "TRANSFORM_AMQP_URL": self.url,
                "TRANSFORM_AMQP_NAMESPACE": self.namespace,
                "TRANSFORM_STORE_URL": f"sqlite:///{self.workdir / 'bench.db'}",
                "TRANSFORM_DATA_DIR": str(self.workdir),
                "TRANSFORM_LOG_LEVEL": "warning",
                # Several workers run side by side: each picks a free metrics port.
                "TRANSFORM_METRICS_HOST": "127.0.0.1",
                "TRANSFORM_METRICS_PORT": "0",
                # Every job has finished when the bench stops the workers.
                "TRANSFORM_SHUTDOWN_GRACE_S": "5",
            }
        )
        return env

    async def prepare(self) -> None:
        workflow = self.workdir / "bench-workflow.yaml"
        workflow.write_text(WORKFLOW_YAML, encoding="utf-8")
        command = [_transform_worker(), "workflows", "put", str(workflow)]
        completed = await asyncio.to_thread(
            subprocess.run,
            command, cwd=ROOT, env=self.environment(), capture_output=True, text=True,
        )  # fmt: skip
        if completed.returncode != 0:
            raise RuntimeError(
                f"`transform-worker workflows put` failed with status {completed.returncode}: "
                f"{completed.stderr.strip() or completed.stdout.strip()}"
            )

    def commands(self) -> list[tuple[str, list[str], dict[str, str]]]:
        command = [_transform_worker(), "run"]
        env = self.environment()
        return [(f"transform-worker-{n}", command, env) for n in range(1, self.processes + 1)]

    def target(self) -> Target:
        def build(index: int, correlation_id: str, reply_to: str) -> aio_pika.Message:
            job_id = str(uuid6.uuid7())
            return aio_pika.Message(
                _command_body(job_id, self.envelope(index)),
                content_type="application/json",
                message_id=job_id,
                correlation_id=correlation_id,
                reply_to=reply_to,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )

        return Target(f"{self.namespace}.commands", "job.create", build, _check_job_reply)


class CeleryWorkers(System):
    """``celery worker`` processes, each a prefork pool of one, running ``celery_app.process``."""

    key = "celery"
    label = "Celery"

    @property
    def work_queue(self) -> str:
        return f"{self.namespace}.celery"

    def names(self) -> Names:
        queue = self.work_queue
        return Names(
            queues=[queue],
            exchanges=[queue, f"{queue}.control", f"{queue}.events"],
        )

    def commands(self) -> list[tuple[str, list[str], dict[str, str]]]:
        env = dict(os.environ)
        env.update(
            {
                "BENCH_AMQP_URL": self.url,
                "BENCH_CELERY_QUEUE": self.work_queue,
                "BENCH_DIR": str(self.workdir),
                "PYTHONPATH": os.pathsep.join(
                    filter(None, [str(BENCH_DIR), env.get("PYTHONPATH")])
                ),
            }
        )
        result = []
        for n in range(1, self.processes + 1):
            command = [
                sys.executable, "-m", "celery", "--app", "celery_app", "worker",
                "--pool", "prefork", "--concurrency", "1",
                "--without-gossip", "--without-mingle", "--without-heartbeat",
                "--loglevel", "WARNING", "--queues", self.work_queue,
                "--hostname", f"{self.namespace}-{n}@%h",
            ]  # fmt: skip
            result.append((f"celery-{n}", command, env))
        return result

    def target(self) -> Target:
        # Imported here so that the other systems run without Celery installed.
        import celery_app

        def build(index: int, correlation_id: str, reply_to: str) -> aio_pika.Message:
            return celery_app.task_message(correlation_id, self.envelope(index), reply_to)

        def check(message: AbstractIncomingMessage) -> str | None:
            if message.type != "bench.completed":
                return f"unexpected reply type {message.type}"
            if not json.loads(message.body).get("code"):
                return "the reply has no document code"
            return None

        return Target("", self.work_queue, build, check)


SYSTEMS: dict[str, type[System]] = {
    Bare.key: Bare,
    TransformWorker.key: TransformWorker,
    CeleryWorkers.key: CeleryWorkers,
}


def _transform_worker() -> str:
    """Return the ``transform-worker`` script of the running interpreter's environment."""
    script = Path(sys.executable).with_name("transform-worker")
    if not script.exists():
        raise SystemExit(
            f"{script} does not exist; install the project into this environment with "
            "`pip install -e '.[dev]'`"
        )
    return str(script)


def _command_body(job_id: str, envelope_json: bytes) -> bytes:
    # Spliced rather than encoded, so the generator does not encode every envelope again.
    head = json.dumps({"id": job_id, "workflow_id": WORKFLOW_ID}, separators=(",", ":"))
    return head[:-1].encode() + b',"data":' + envelope_json + b"}"


def _check_job_reply(message: AbstractIncomingMessage) -> str | None:
    status = (message.headers or {}).get("x-status")
    if message.type != "job.completed" or status != 200:
        return f"reply {message.type} with x-status {status!r}: {message.body[:200]!r}"
    job: dict[str, Any] = json.loads(message.body)
    faults = job.get("faults") or []
    if faults:
        return f"job {job.get('id')} failed: {faults[0]}"
    return None


async def wait_for_consumers(
    url: str,
    queue: str,
    count: int,
    services: Sequence[Service],
    timeout_s: float = READY_TIMEOUT_S,
) -> None:
    """Wait until ``queue`` exists and has ``count`` consumers; fail early if a service exits."""
    deadline = time.monotonic() + timeout_s
    connection = await aio_pika.connect(url)
    async with connection:
        consumers = 0
        while time.monotonic() < deadline:
            processes.check_running(services)
            # A passive declare of a missing queue closes the channel, so use a new one.
            channel = await connection.channel()
            try:
                declared = await channel.declare_queue(queue, passive=True)
                consumers = declared.declaration_result.consumer_count or 0
            except AMQPError:
                consumers = 0
            finally:
                if not channel.is_closed:
                    await channel.close()
            if consumers >= count:
                return
            await asyncio.sleep(0.2)
    logs = "\n".join(f"--- {service.name}:\n{service.log_tail()}" for service in services)
    raise RuntimeError(
        f"queue {queue} had {consumers} of {count} consumers after {timeout_s:g} s\n{logs}"
    )


async def delete_names(url: str, names: Names) -> list[str]:
    """Delete the queues and exchanges; return the ones that could not be deleted."""
    failures = []
    connection = await aio_pika.connect(url)
    async with connection:
        for queue in names.queues:
            channel = await connection.channel()
            try:
                await channel.queue_delete(queue)
            except AMQPError as exc:
                failures.append(f"queue {queue}: {exc!r}")
            finally:
                if not channel.is_closed:
                    await channel.close()
        for exchange in names.exchanges:
            channel = await connection.channel()
            try:
                await channel.exchange_delete(exchange)
            except AMQPError as exc:
                failures.append(f"exchange {exchange}: {exc!r}")
            finally:
                if not channel.is_closed:
                    await channel.close()
    return failures


def broker_names(prefix: str) -> Names:
    """Return the queues and exchanges on the broker whose names start with ``prefix``.

    Uses ``rabbitmqctl``, so it also finds names the bench did not expect a system
    to declare.
    """
    found = []
    for kind in ("list_queues", "list_exchanges"):
        completed = subprocess.run(
            ["rabbitmqctl", "-q", kind, "--no-table-headers", "name"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        found.append([line for line in completed.stdout.split() if line.startswith(prefix)])
    return Names(queues=found[0], exchanges=found[1])
