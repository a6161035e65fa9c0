"""Prometheus metrics, and the HTTP endpoint that serves them with health checks.

``/metrics`` is the Prometheus text format. ``/healthz`` returns 200 while the process
runs its event loop. ``/readyz`` returns 200 only while the consumer is attached to
the broker and the store responds to a ping, and 503 with the reason otherwise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = structlog.get_logger("worker.metrics")

#: Step durations in seconds: from a millisecond (built-in actions) to five minutes.
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

ReadinessCheck = Callable[[], Awaitable[str | None]]


class Metrics:
    """The worker's metrics, in a registry of their own so that workers never share them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.jobs_accepted = Counter(
            "transform_jobs_accepted",
            "Jobs stored from create-job commands",
            ["workflow_id"],
            registry=self.registry,
        )
        self.jobs_completed = Counter(
            "transform_jobs_completed",
            "Jobs that finished without faults",
            ["workflow_id"],
            registry=self.registry,
        )
        self.jobs_failed = Counter(
            "transform_jobs_failed",
            "Jobs that finished with at least one fault",
            ["workflow_id"],
            registry=self.registry,
        )
        self.commands_rejected = Counter(
            "transform_commands_rejected",
            "Commands answered with job.rejected, by error key and status",
            ["key", "status"],
            registry=self.registry,
        )
        self.step_duration = Histogram(
            "transform_step_duration_seconds",
            "Time a step took, by action and final status",
            ["action", "status"],
            buckets=STEP_BUCKETS,
            registry=self.registry,
        )
        self.retries_scheduled = Counter(
            "transform_retries_scheduled",
            "Steps rescheduled to run again later, by action",
            ["action"],
            registry=self.registry,
        )
        self.replies_undeliverable = Counter(
            "transform_replies_undeliverable",
            "Replies the broker returned because the caller's queue was gone",
            registry=self.registry,
        )
        self.jobs_in_flight = Gauge(
            "transform_jobs_in_flight",
            "Jobs this worker is running now",
            registry=self.registry,
        )
        self.consumer_connected = Gauge(
            "transform_consumer_connected",
            "1 while the consumer is attached to the broker, else 0",
            registry=self.registry,
        )

    def render(self) -> bytes:
        """Return every metric in the Prometheus text format."""
        return generate_latest(self.registry)


class HealthServer:
    """A small HTTP/1.1 server for ``/metrics``, ``/healthz`` and ``/readyz``."""

    def __init__(self, metrics: Metrics, readiness: ReadinessCheck) -> None:
        self.metrics = metrics
        self.readiness = readiness
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0 picks a free port) and return the port."""
        self._server = await asyncio.start_server(self._serve, host, port)
        bound: int = self._server.sockets[0].getsockname()[1]
        log.info("metrics.listening", host=host, port=bound)
        return bound

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), timeout=5)
            # Headers are read and ignored; no endpoint takes a body.
            while (line := await asyncio.wait_for(reader.readline(), timeout=5)) not in (
                b"\r\n",
                b"\n",
                b"",
            ):
                del line
            status, content_type, body = await self._respond(request)
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError) as exc:
            # A client that stalls or hangs up gets nothing more.
            log.debug("metrics.request_dropped", error=repr(exc))
        finally:
            writer.close()

    async def _respond(self, request: bytes) -> tuple[str, str, bytes]:
        parts = request.decode("latin-1").split()
        if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"only GET is supported\n"
        path = parts[1].split("?", 1)[0]
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, self.metrics.render()
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            problem = await self.readiness()
            if problem is None:
                return "200 OK", "text/plain", b"ready\n"
            return "503 Service Unavailable", "text/plain", f"not ready: {problem}\n".encode()
        return "404 Not Found", "text/plain", b"endpoints: /metrics /healthz /readyz\n"
