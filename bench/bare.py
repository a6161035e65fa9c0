"""The bare limit: an aio-pika service that only replies, for comparison with real workers.

It consumes persistent messages from a quorum queue with the worker's default
prefetch, publishes each body back to the message's ``reply_to`` queue as a
persistent, mandatory message, waits for the broker's confirm, and then acks. That
is the broker round trip every job worker on this machine pays, with no job work.

Usage: ``python bench/bare.py --queue NAME [--url URL] [--prefetch N]``; SIGTERM or
SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aio_pika.exceptions import DeliveryError

#: The arguments the bench declares the queue with; a redeclaration must match them.
QUEUE_ARGUMENTS: dict[str, Any] = {"x-queue-type": "quorum"}


async def serve(url: str, queue_name: str, prefetch: int) -> None:
    """Reply to every message of ``queue_name`` until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    connection = await aio_pika.connect(
        url, client_properties={"connection_name": "transform-worker bench bare"}
    )
    async with connection:
        # Replies go out on their own channel, as in the worker, so a slow confirm never
        # holds up deliveries on the consuming channel.
        reply_channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        consume_channel = await connection.channel()
        await consume_channel.set_qos(prefetch_count=prefetch)
        queue = await consume_channel.declare_queue(
            queue_name, durable=True, arguments=QUEUE_ARGUMENTS
        )

        async def on_message(message: AbstractIncomingMessage) -> None:
            try:
                await reply(reply_channel, message)
            except DeliveryError as exc:
                # The reply queue is gone, so the caller is too: drop the message.
                print(f"reply to {message.reply_to} failed: {exc!r}", file=sys.stderr)
            await message.ack()

        tag = await queue.consume(on_message, no_ack=False)
        await stop.wait()
        # Unacknowledged deliveries go back to the queue when the channel closes.
        await queue.cancel(tag)


async def reply(channel: AbstractChannel, message: AbstractIncomingMessage) -> None:
    """Publish the message's body to its ``reply_to`` queue and wait for the confirm."""
    if not message.reply_to:
        return
    answer = aio_pika.Message(
        message.body,
        content_type=message.content_type,
        correlation_id=message.correlation_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        type="bare.reply",
    )
    await channel.default_exchange.publish(answer, message.reply_to, mandatory=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", required=True, help="quorum queue to consume")
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/", help="broker URL")
    parser.add_argument(
        "--prefetch", type=int, default=32, help="unacknowledged messages at once (default 32)"
    )
    args = parser.parse_args()
    asyncio.run(serve(args.url, args.queue, args.prefetch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
