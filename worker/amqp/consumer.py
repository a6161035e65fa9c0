"""The work-queue consumer: turns deliveries into engine calls and settles them.

This is the one place that acknowledges or requeues a command. Acknowledgement
follows the engine's decision, which is only made once the command's outcome is
durable (a stored job, a published rejection).
"""

from __future__ import annotations

import time

import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from structlog.contextvars import bound_contextvars

from worker.engine.core import Engine, Settlement
from worker.engine.messages import Delivery

log = structlog.get_logger("worker.consumer")


def to_delivery(message: AbstractIncomingMessage) -> Delivery:
    """Copy what the engine needs out of an aio-pika message."""
    headers = message.headers or {}
    count = headers.get("x-delivery-count", 0)
    return Delivery(
        routing_key=message.routing_key or "",
        body=message.body,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        reply_to=message.reply_to,
        correlation_id=message.correlation_id,
        message_id=message.message_id,
        delivery_count=count if isinstance(count, int) else 0,
        user_id=message.user_id,
    )


class Consumer:
    """Consumes the work queue on behalf of an engine."""

    def __init__(self, queue: AbstractQueue, engine: Engine) -> None:
        self.queue = queue
        self.engine = engine
        self._tag: str | None = None
        self._stopping = False

    async def start(self) -> None:
        self._tag = await self.queue.consume(self._on_message, no_ack=False)
        log.info("consumer.started", queue=self.queue.name)

    async def stop(self) -> None:
        """Stop receiving; messages not yet taken in are requeued by their callbacks."""
        self._stopping = True
        if self._tag is None:
            return
        try:
            await self.queue.cancel(self._tag)
        except CONNECTION_EXCEPTIONS as exc:
            log.warning("consumer.cancel_failed", error=repr(exc))
        self._tag = None
        log.info("consumer.stopped", queue=self.queue.name)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        delivery = to_delivery(message)
        with bound_contextvars(message_id=delivery.message_id):
            if self._stopping:
                await self._settle(message, Settlement.REQUEUE)
                return
            started = time.monotonic()
            settlement = await self.engine.handle(delivery)
            await self._settle(message, settlement)
            log.debug(
                "message.settled",
                outcome=settlement.value,
                duration_ms=round((time.monotonic() - started) * 1000, 1),
            )

    async def _settle(self, message: AbstractIncomingMessage, settlement: Settlement) -> None:
        try:
            if settlement is Settlement.ACK:
                await message.ack()
            else:
                await message.nack(requeue=True)
        except CONNECTION_EXCEPTIONS as exc:
            # The channel closed under us, so the broker requeues the message itself;
            # its next delivery is recognised as a duplicate of what was stored.
            log.warning("message.settle_failed", outcome=settlement.value, error=repr(exc))
