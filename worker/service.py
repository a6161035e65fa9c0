"""The long-running worker: start-up, the consume loop and an ordered shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import Any, TypeVar

import aio_pika
import httpx
import structlog
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from worker.actions.registry import ActionRegistry, default_registry
from worker.amqp.consumer import Consumer
from worker.amqp.publisher import AmqpPublisher
from worker.amqp.topology import Topology, declare
from worker.engine.core import Engine
from worker.engine.services import ServicesFactory
from worker.errors import TransientError
from worker.keys import SigningKeyProvider
from worker.metrics import HealthServer, Metrics
from worker.settings import Settings
from worker.store import Store, create_store
from worker.workflows import load_workflow_files, put_workflow

log = structlog.get_logger("worker.service")

T = TypeVar("T")


class WorkerState(Enum):
    #: Created, not started.
    NEW = "new"
    #: Consuming commands.
    RUNNING = "running"
    #: Shutdown requested; finishing running jobs.
    STOPPING = "stopping"
    #: Everything closed.
    STOPPED = "stopped"


class Worker:
    """One worker process: a store, a broker connection, an engine and a consumer.

    ``run()`` returns after ``request_stop()`` once the shutdown sequence is done.
    """

    def __init__(self, settings: Settings, *, registry: ActionRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or default_registry()
        self.state = WorkerState.NEW
        self.started = asyncio.Event()
        self.engine: Engine | None = None
        self._stop = asyncio.Event()
        self._immediate = asyncio.Event()
        self._connection: AbstractRobustConnection | None = None
        self._store: Store | None = None
        self._http: httpx.AsyncClient | None = None
        self._consuming = False
        self.metrics = Metrics()
        self._health = HealthServer(self.metrics, self._readiness)
        #: Port of the metrics and health server, once it listens.
        self.metrics_port: int | None = None

    def request_stop(self, *, immediate: bool = False) -> None:
        """Begin the shutdown; ``immediate`` skips the grace period for running jobs."""
        if immediate:
            self._immediate.set()
        self._stop.set()

    async def run(self) -> None:
        if self.state is not WorkerState.NEW:
            raise RuntimeError(f"a worker runs once; this one is {self.state.value}")
        self.state = WorkerState.RUNNING
        tasks: list[asyncio.Task[Any]] = []
        consumer: Consumer | None = None
        try:
            await self._start_health_server()
            store = await self._until_ready("store", self._open_store)
            if store is None:
                return
            await self._load_workflows(store)
            connected = await self._until_ready("broker", lambda: self._connect(store))
            if connected is None:
                return
            engine, consumer = connected
            tasks = [
                asyncio.create_task(engine.sweep_forever(), name="sweeper"),
                asyncio.create_task(engine.renew_leases_forever(), name="leases"),
            ]
            log.info(
                "worker.started",
                owner=engine.owner,
                prefetch=self.settings.prefetch,
                namespace=self.settings.amqp_namespace,
                store=self.settings.store_url.split(":", 1)[0],
            )
            self.started.set()
            await self._stop.wait()
        finally:
            await self._shutdown(consumer, tasks)

    async def _start_health_server(self) -> None:
        try:
            self.metrics_port = await self._health.start(
                self.settings.metrics_host, self.settings.metrics_port
            )
        except OSError as exc:
            # The worker still does its job; only its probes and metrics are missing,
            # which an orchestrator notices through its failing probes.
            log.error(
                "metrics.unavailable",
                host=self.settings.metrics_host,
                port=self.settings.metrics_port,
                error=repr(exc),
            )

    async def _until_ready(self, component: str, start: Callable[[], Awaitable[T]]) -> T | None:
        """Start a component, retrying with backoff until it works or a stop is requested.

        A worker started before its store or broker comes up waits for them instead of
        exiting, and /readyz reports what it waits for meanwhile.
        """
        delay = 0.5
        while not self._stop.is_set():
            try:
                return await start()
            except (TransientError, *CONNECTION_EXCEPTIONS) as exc:
                log.warning(
                    "worker.start_retrying", component=component, error=repr(exc), delay_s=delay
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=delay)
            delay = min(delay * 2, 10.0)
        return None

    async def _open_store(self) -> Store:
        store = create_store(self.settings)
        await store.open()
        self._store = store
        return store

    async def _readiness(self) -> str | None:
        """Return why the worker is not ready to take commands, or None when it is."""
        if self.state is not WorkerState.RUNNING:
            return f"worker is {self.state.value}"
        if self._store is None:
            return "store is not open yet"
        if self._connection is None or self._connection.is_closed or not self._consuming:
            return "not consuming from the broker"
        try:
            await asyncio.wait_for(self._store.ping(), timeout=2)
        except Exception as exc:
            # Whatever the reason, a store that fails a ping makes the worker unready.
            return f"store does not answer: {exc!r}"
        return None

    async def _load_workflows(self, store: Store) -> None:
        directory = self.settings.workflows_dir
        if directory is None:
            return
        for workflow in load_workflow_files([directory]):
            record = await put_workflow(store, self.registry, workflow)
            log.info(
                "workflow.loaded",
                workflow_id=workflow.id,
                workspace_id=workflow.workspace_id,
                version=record.version,
            )

    async def _connect(self, store: Store) -> tuple[Engine, Consumer]:
        connection = await aio_pika.connect_robust(
            self.settings.amqp_url.get_secret_value(),
            client_properties={
                "connection_name": f"transform-worker {socket.gethostname()} pid {os.getpid()}"
            },
        )
        self._connection = connection
        connection.close_callbacks.add(self._on_connection_closed)
        connection.reconnect_callbacks.add(self._on_reconnected)
        publish_channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        declared = await declare(publish_channel, Topology.from_settings(self.settings))
        publisher = AmqpPublisher(
            publish_channel, declared, timeout_s=self.settings.publish_timeout_s
        )

        keys = SigningKeyProvider(self.settings)
        # Redirects are not followed, so a webhook cannot be bounced off the allow-list.
        self._http = httpx.AsyncClient(follow_redirects=False)
        services = ServicesFactory(
            store,
            signing_key=keys,
            webhook_allow_hosts=self.settings.webhook_hosts,
            http=self._http,
        )
        engine = Engine(store, publisher, self.registry, services, self.settings, self.metrics)
        self.engine = engine

        consume_channel = await connection.channel(publisher_confirms=False)
        await consume_channel.set_qos(prefetch_count=self.settings.prefetch)
        # Declared (with the same arguments) rather than fetched, because only a queue
        # declared on a robust channel gets its consumer back after a reconnection.
        queue = await consume_channel.declare_queue(
            declared.jobs.name,
            durable=True,
            arguments=Topology.from_settings(self.settings).jobs_arguments(),
        )
        consumer = Consumer(queue, engine)
        await consumer.start()
        self._set_consuming(True)
        return engine, consumer

    def _set_consuming(self, consuming: bool) -> None:
        self._consuming = consuming
        self.metrics.consumer_connected.set(1 if consuming else 0)

    def _on_reconnected(self, _: Any) -> None:
        self._set_consuming(True)
        log.info("amqp.reconnected")

    def _on_connection_closed(self, _: Any, exc: BaseException | None) -> None:
        self._set_consuming(False)
        if self.state is not WorkerState.RUNNING:
            log.debug("amqp.connection_closed")
        elif exc is not None:
            log.warning("amqp.connection_lost", error=repr(exc))

    async def _shutdown(self, consumer: Consumer | None, tasks: list[asyncio.Task[Any]]) -> None:
        """Stop in order: consuming, new work, running jobs, background loops, connections."""
        self.state = WorkerState.STOPPING
        log.info("worker.stopping", immediate=self._immediate.is_set())
        # 1. No new commands: prefetched ones are requeued by their callbacks.
        if consumer is not None:
            await consumer.stop()
        # 2. No new claims from the sweeper.
        cancelled = 0
        if self.engine is not None:
            await self.engine.stop_accepting()
            # 3. Running jobs get the grace period, then are cancelled and released
            #    so that another worker resumes them at once.
            grace = 0.0 if self._immediate.is_set() else self.settings.shutdown_grace_s
            cancelled = await self.engine.drain(grace, cut_short=self._immediate)
        # 4. Background loops.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # 5. Connections last, so that releases and replies above could still be written.
        if self._connection is not None:
            await self._connection.close()
        if self._http is not None:
            await self._http.aclose()
        await self._health.close()
        if self._store is not None:
            await self._store.close()
        self.state = WorkerState.STOPPED
        log.info("worker.stopped", jobs_cancelled=cancelled)
