"""The load generator shared by every system under test.

It publishes persistent messages with publisher confirms, each with its own
correlation id and ``reply_to`` set to one exclusive reply queue, and records the
time from the start of each publish to the arrival of its reply. Two shapes:

- ``run_window``: closed loop, keeping ``window`` messages in flight, to find the
  saturated rate.
- ``run_paced``: open loop, starting publishes at a fixed rate whatever the replies do,
  to measure latency below saturation.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aio_pika
import uuid6
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import DeliveryError

#: Builds the command for message ``index`` with the given correlation id and reply queue.
MessageFactory = Callable[[int, str, str], aio_pika.Message]

#: Returns None for a successful reply, or a short reason why the reply is a failure.
ReplyCheck = Callable[[AbstractIncomingMessage], str | None]


@dataclass(frozen=True)
class Target:
    """The destination, message factory and reply check of one system's commands."""

    exchange: str  # "" is the default exchange, so routing_key is a queue name
    routing_key: str
    build: MessageFactory
    check: ReplyCheck


@dataclass
class RunResult:
    """The outcome of one load run; latencies are in seconds, one per successful reply."""

    sent: int
    elapsed_s: float
    latencies_s: list[float] = field(default_factory=list)
    failed: int = 0  # replies that arrived but whose check failed
    lost: int = 0  # messages without a reply within the timeout
    first_failure: str | None = None
    max_start_lag_s: float = 0.0  # paced runs only: how far publishes fell behind schedule

    @property
    def succeeded(self) -> int:
        return len(self.latencies_s)

    @property
    def rate_per_s(self) -> float:
        return self.succeeded / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def percentile_ms(self, fraction: float) -> float:
        """Return the latency below which ``fraction`` of the replies arrived (nearest rank)."""
        if not self.latencies_s:
            return float("nan")
        ordered = sorted(self.latencies_s)
        rank = min(max(1, math.ceil(fraction * len(ordered))), len(ordered))
        return ordered[rank - 1] * 1000


class LoadGenerator:
    """Publishes commands on one channel and matches replies by correlation id.

    Use as ``async with LoadGenerator(url, reply_queue, target) as load: ...``. The
    reply queue is exclusive to this connection, so the broker deletes it when the
    connection closes, even when the process dies.
    """

    def __init__(
        self, url: str, reply_queue: str, target: Target, *, reply_timeout_s: float = 120.0
    ) -> None:
        self.url = url
        self.reply_queue_name = reply_queue
        self.target = target
        self.reply_timeout_s = reply_timeout_s
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self._replies: AbstractQueue | None = None
        self._waiting: dict[str, asyncio.Future[AbstractIncomingMessage]] = {}

    async def __aenter__(self) -> LoadGenerator:
        self._connection = await aio_pika.connect(
            self.url, client_properties={"connection_name": "transform-worker bench load"}
        )
        self._channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        if self.target.exchange:
            self._exchange = await self._channel.get_exchange(self.target.exchange, ensure=False)
        else:
            self._exchange = self._channel.default_exchange
        self._replies = await self._channel.declare_queue(
            self.reply_queue_name, exclusive=True, durable=False
        )
        await self._replies.consume(self._on_reply, no_ack=True)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for future in self._waiting.values():
            future.cancel()
        self._waiting.clear()
        if self._connection is not None:
            await self._connection.close()
        self._connection = None

    async def run_window(self, jobs: int, window: int, first_index: int = 0) -> RunResult:
        """Publish ``jobs`` messages keeping at most ``window`` without a reply."""
        result = RunResult(sent=jobs, elapsed_s=0.0)
        next_index = first_index
        last_index = first_index + jobs

        async def lane() -> None:
            nonlocal next_index
            while next_index < last_index:
                index = next_index
                next_index += 1
                await self._round_trip(index, time.perf_counter(), result)

        started = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(min(window, jobs))))
        result.elapsed_s = time.perf_counter() - started
        return result

    async def run_paced(self, jobs: int, rate_per_s: float, first_index: int = 0) -> RunResult:
        """Start one publish every ``1 / rate_per_s`` seconds, not waiting for replies.

        Latency counts from the scheduled start, not the actual one, so a generator
        that falls behind adds its delay to the latency instead of hiding it.
        """
        if rate_per_s <= 0:
            raise ValueError(f"rate_per_s must be positive, not {rate_per_s}")
        result = RunResult(sent=jobs, elapsed_s=0.0)
        interval_s = 1.0 / rate_per_s
        started = time.perf_counter()
        tasks = []
        for offset in range(jobs):
            scheduled = started + offset * interval_s
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                result.max_start_lag_s = max(result.max_start_lag_s, -delay)
            round_trip = self._round_trip(first_index + offset, scheduled, result)
            tasks.append(asyncio.create_task(round_trip))
        await asyncio.gather(*tasks)
        result.elapsed_s = time.perf_counter() - started
        return result

    async def _round_trip(self, index: int, started: float, result: RunResult) -> None:
        if self._exchange is None or self._replies is None:
            raise RuntimeError("the load generator is not connected; use `async with`")
        correlation_id = str(uuid6.uuid7())
        future: asyncio.Future[AbstractIncomingMessage] = asyncio.get_running_loop().create_future()
        self._waiting[correlation_id] = future
        message = self.target.build(index, correlation_id, self._replies.name)
        try:
            await self._exchange.publish(message, self.target.routing_key, mandatory=True)
            reply = await asyncio.wait_for(future, self.reply_timeout_s)
        except TimeoutError:
            result.lost += 1
            return
        except DeliveryError as exc:
            # The broker returned or rejected the command, so no reply will come.
            result.failed += 1
            result.first_failure = result.first_failure or f"publish failed: {exc!r}"
            return
        finally:
            self._waiting.pop(correlation_id, None)
        elapsed = time.perf_counter() - started
        failure = self.target.check(reply)
        if failure is None:
            result.latencies_s.append(elapsed)
        else:
            result.failed += 1
            result.first_failure = result.first_failure or failure

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._waiting.get(message.correlation_id or "")
        if future is not None and not future.done():
            future.set_result(message)
