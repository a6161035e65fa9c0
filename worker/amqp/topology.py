"""Exchanges and queues the worker declares at start, idempotently."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue
from aiormq.exceptions import ChannelPreconditionFailed

from contracts import CREATE_JOB, GET_JOB
from worker.settings import Settings


class TopologyMismatch(RuntimeError):
    """A queue or exchange exists with other settings than the worker declares."""


@dataclass(frozen=True)
class Topology:
    """Names of the worker's exchanges and queues, all under one namespace prefix."""

    commands: str
    #: Alternate exchange of ``commands``: messages with an unknown routing key reach
    #: the work queue through it, so the worker rejects them instead of the broker
    #: dropping them unseen.
    unrouted: str
    jobs: str
    events: str
    dead: str
    delivery_limit: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Topology:
        return cls(
            commands=settings.exchange("commands"),
            unrouted=settings.exchange("unrouted"),
            jobs=settings.exchange("jobs"),
            events=settings.exchange("events"),
            dead=settings.exchange("dead"),
            delivery_limit=settings.delivery_limit,
        )

    def commands_arguments(self) -> dict[str, Any]:
        return {"alternate-exchange": self.unrouted}

    def jobs_arguments(self) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": self.dead,
        }


@dataclass(frozen=True)
class Declared:
    commands: AbstractExchange
    events: AbstractExchange
    dead: AbstractExchange
    jobs: AbstractQueue


async def declare(channel: AbstractChannel, topology: Topology) -> Declared:
    """Declare everything the worker uses; an existing match is left as it is.

    Raises TopologyMismatch when the work queue exists with other arguments, which
    RabbitMQ refuses to change in place.
    """
    unrouted = await channel.declare_exchange(
        topology.unrouted, aio_pika.ExchangeType.FANOUT, durable=True
    )
    try:
        commands = await channel.declare_exchange(
            topology.commands,
            aio_pika.ExchangeType.DIRECT,
            durable=True,
            arguments=topology.commands_arguments(),
        )
    except ChannelPreconditionFailed as exc:
        raise TopologyMismatch(
            f"exchange {topology.commands} exists with other arguments than "
            f"{topology.commands_arguments()}; delete the exchange, and the worker declares "
            "it again when it starts"
        ) from exc
    events = await channel.declare_exchange(
        topology.events, aio_pika.ExchangeType.TOPIC, durable=True
    )
    dead = await channel.declare_exchange(topology.dead, aio_pika.ExchangeType.FANOUT, durable=True)
    dead_queue = await channel.declare_queue(topology.dead, durable=True)
    await dead_queue.bind(dead)
    try:
        jobs = await channel.declare_queue(
            topology.jobs, durable=True, arguments=topology.jobs_arguments()
        )
    except ChannelPreconditionFailed as exc:
        raise TopologyMismatch(
            f"queue {topology.jobs} exists with other arguments than "
            f"{topology.jobs_arguments()}; set TRANSFORM_DELIVERY_LIMIT to match it, "
            "or delete the queue once it is empty"
        ) from exc
    for routing_key in (CREATE_JOB, GET_JOB):
        await jobs.bind(commands, routing_key)
    await jobs.bind(unrouted)
    return Declared(commands=commands, events=events, dead=dead, jobs=jobs)
