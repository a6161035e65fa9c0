"""Publishing replies, events and dead letters with confirms and a timeout."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractExchange, FieldValue
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, PublishError

from worker.amqp.topology import Declared
from worker.engine.messages import Delivery, Outgoing
from worker.errors import TransientError

log = structlog.get_logger("worker.publisher")

JSON = "application/json"


class AmqpPublisher:
    """The engine's ``Publisher`` on a confirming aio-pika channel."""

    def __init__(self, channel: AbstractChannel, declared: Declared, *, timeout_s: float) -> None:
        self.channel = channel
        self.declared = declared
        self.timeout_s = timeout_s

    async def publish_reply(self, message: Outgoing) -> bool:
        try:
            await self._publish(
                self.channel.default_exchange, message, message.routing_key, mandatory=True
            )
        except PublishError:
            return False
        return True

    async def publish_event(self, message: Outgoing) -> None:
        await self._publish(self.declared.events, message, message.routing_key, mandatory=False)

    async def publish_dead_letter(self, delivery: Delivery, *, reason: str, status: int) -> None:
        headers: dict[str, FieldValue] = {
            "x-reject-reason": reason,
            "x-reject-status": status,
            "x-original-routing-key": delivery.routing_key,
            "x-delivery-count": delivery.delivery_count,
        }
        message = aio_pika.Message(
            delivery.body,
            content_type=delivery.content_type,
            content_encoding=delivery.content_encoding,
            correlation_id=delivery.correlation_id,
            reply_to=delivery.reply_to,
            message_id=delivery.message_id,
            headers=headers,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            timestamp=datetime.now(UTC),
        )
        await self._send(self.declared.dead, message, delivery.routing_key, mandatory=False)
        log.warning("command.dead_lettered", reason=reason, status=status)

    async def _publish(
        self, exchange: AbstractExchange, message: Outgoing, routing_key: str, *, mandatory: bool
    ) -> None:
        amqp_message = aio_pika.Message(
            message.body,
            content_type=JSON,
            type=message.type,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            headers=dict(message.headers),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            timestamp=datetime.now(UTC),
        )
        await self._send(exchange, amqp_message, routing_key, mandatory=mandatory)

    async def _send(
        self,
        exchange: AbstractExchange,
        message: aio_pika.Message,
        routing_key: str,
        *,
        mandatory: bool,
    ) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                await exchange.publish(message, routing_key, mandatory=mandatory)
        except TimeoutError as exc:
            raise TransientError(
                f"the broker did not confirm a message to {routing_key!r} "
                f"within {self.timeout_s:g} s"
            ) from exc
        except PublishError:
            raise
        except CONNECTION_EXCEPTIONS as exc:
            raise TransientError(f"publishing to {routing_key!r} failed: {exc!r}") from exc
