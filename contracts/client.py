"""A small publisher client for transform-worker, on aio-pika.

>>> async with JobsClient("amqp://guest:guest@127.0.0.1:5672/") as client:
...     job = await client.create_job({"workflow_id": "invoice", "data": envelope}, wait=30)

``create_job`` returns the job from the ``job.completed`` reply, or the snapshot of a
``job.pending`` reply (``job.completed_at`` is None) when ``wait`` ran out first, and
raises ``JobRejected`` for a ``job.rejected`` reply. The client fills in a UUID v7
``id`` when the command has none, so publishing the same command again after a
timeout is recognised by the worker as a duplicate rather than a second job.

Replies arrive on a queue named after the client that outlives short connection
losses (it expires ten minutes after the client is gone), so a reply sent while the
connection is being restored is not lost.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import uuid6
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, ChannelNotFoundEntity
from aiormq.abc import DeliveredMessage

from contracts.commands import CREATE_JOB, GET_JOB, CreateJob, GetJob
from contracts.errors import Error
from contracts.jobs import Job

#: How long the reply queue survives without a consumer, in milliseconds.
REPLY_QUEUE_EXPIRES_MS = 10 * 60 * 1000


class JobRejected(Exception):
    """The worker rejected the command; ``error`` gives the reason, ``status`` the HTTP code."""

    def __init__(self, error: Error, status: int) -> None:
        super().__init__(f"{status} {error.key}: {error.message}")
        self.error = error
        self.status = status


class ReplyTimeout(TimeoutError):
    """No reply arrived within the client-side timeout.

    ``job_id`` is the id the command carried, when it was a ``job.create``: send the
    command again with that ``id`` (or ``get_job(id=…)``) to reach the same job.
    """

    def __init__(self, message: str, *, job_id: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id


class CommandNotRouted(ConnectionError):
    """The broker had no queue for the command: the worker's topology is missing."""


class JobsClient:
    """Publishes commands to the worker and waits for their replies."""

    def __init__(
        self,
        url: str = "amqp://guest:guest@127.0.0.1:5672/",
        *,
        namespace: str = "transform",
        timeout_s: float = 60.0,
        connection_name: str = "transform-worker client",
    ) -> None:
        self.url = url
        # Sent as the AMQP user_id, which RabbitMQ checks against the login; a worker
        # that binds workspaces to broker users reads the workspace from it.
        self.user_id = unquote(urlsplit(url).username or "guest")
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.connection_name = connection_name
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._commands: AbstractExchange | None = None
        self._replies: AbstractQueue | None = None
        self._waiting: dict[str, asyncio.Future[AbstractIncomingMessage]] = {}
        self._consumer_tag: str | None = None

    async def __aenter__(self) -> JobsClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect, and declare the reply queue; calling it twice is an error."""
        if self._connection is not None:
            raise RuntimeError("the client is already connected")
        self._connection = await aio_pika.connect_robust(
            self.url, client_properties={"connection_name": self.connection_name}
        )
        self._channel = await self._connection.channel(publisher_confirms=True)
        try:
            self._commands = await self._channel.get_exchange(
                f"{self.namespace}.commands", ensure=True
            )
        except ChannelNotFoundEntity:
            await self.close()
            raise CommandNotRouted(
                f"exchange {self.namespace}.commands does not exist; a worker declares it "
                "when it starts, so start one or check the namespace"
            ) from None
        self._replies = await self._channel.declare_queue(
            f"{self.namespace}.replies.{uuid6.uuid7()}",
            durable=False,
            arguments={"x-expires": REPLY_QUEUE_EXPIRES_MS},
        )
        self._consumer_tag = await self._replies.consume(self._on_reply, no_ack=True)

    async def close(self) -> None:
        """Close the connection; pending calls fail. Safe to call twice."""
        for future in self._waiting.values():
            if not future.done():
                future.cancel()
        self._waiting.clear()
        if self._replies is not None and self._channel is not None and not self._channel.is_closed:
            if self._consumer_tag is not None:
                await self._replies.cancel(self._consumer_tag)
            await self._replies.delete(if_unused=False, if_empty=False)
        self._consumer_tag = None
        self._replies = None
        if self._connection is not None:
            await self._connection.close()
        self._connection = None

    @property
    def reply_queue(self) -> str:
        """Name of the queue this client receives replies on."""
        if self._replies is None:
            raise RuntimeError("the client is not connected")
        return self._replies.name

    async def create_job(
        self,
        command: CreateJob | Mapping[str, Any],
        *,
        wait: int | None = None,
        timeout_s: float | None = None,
    ) -> Job:
        """Publish a ``job.create`` command and return the job from its reply."""
        body = _command_body(command, wait)
        try:
            reply = await self.request(CREATE_JOB, body, message_id=body["id"], timeout_s=timeout_s)
        except ReplyTimeout as exc:
            raise ReplyTimeout(str(exc), job_id=body["id"]) from None
        return _job_from(reply)

    async def get_job(
        self,
        *,
        id: str | None = None,
        key: str | None = None,
        workspace_id: str | None = None,
        timeout_s: float | None = None,
    ) -> Job:
        """Fetch a job by id or key with a ``job.get`` command.

        Without ``workspace_id`` the worker uses ``default``, or the caller's workspace
        when it binds workspaces to broker users.
        """
        query = GetJob.model_validate(
            {"id": id, "key": key}
            | ({"workspace_id": workspace_id} if workspace_id is not None else {})
        )
        reply = await self.request(
            GET_JOB,
            query.model_dump(mode="json", exclude_none=True, exclude_unset=True),
            timeout_s=timeout_s,
        )
        return _job_from(reply)

    async def publish(
        self,
        routing_key: str,
        body: Mapping[str, Any],
        *,
        message_id: str | None = None,
        correlation_id: str | None = None,
        reply: bool = True,
    ) -> str:
        """Publish a command without waiting for its reply; return its correlation id."""
        if self._commands is None:
            raise RuntimeError("the client is not connected; use `async with JobsClient()`")
        correlation_id = correlation_id or str(uuid6.uuid7())
        message = aio_pika.Message(
            json.dumps(body).encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            correlation_id=correlation_id,
            reply_to=self.reply_queue if reply else None,
            user_id=self.user_id,
        )
        await self._publish_until_confirmed(message, routing_key)
        return correlation_id

    async def _publish_until_confirmed(self, message: aio_pika.Message, routing_key: str) -> None:
        """Publish, waiting out a reconnection of the robust connection if there is one.

        A command that is published twice is harmless: it carries its job id, and the
        worker replies to a repeated id from the job it already has.
        """
        assert self._commands is not None and self._channel is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while True:
            try:
                result = await self._commands.publish(
                    message, routing_key, mandatory=True, timeout=self.timeout_s
                )
            except CONNECTION_EXCEPTIONS:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.1)
                continue
            if isinstance(result, DeliveredMessage):
                raise CommandNotRouted(
                    f"no queue takes {routing_key} on {self._commands.name}; "
                    "has a worker ever started in this namespace?"
                )
            return

    async def request(
        self,
        routing_key: str,
        body: Mapping[str, Any],
        *,
        message_id: str | None = None,
        timeout_s: float | None = None,
    ) -> AbstractIncomingMessage:
        """Publish a command and return the raw reply message."""
        correlation_id = str(uuid6.uuid7())
        future: asyncio.Future[AbstractIncomingMessage] = asyncio.get_running_loop().create_future()
        self._waiting[correlation_id] = future
        try:
            await self.publish(
                routing_key, body, message_id=message_id, correlation_id=correlation_id
            )
            limit = timeout_s if timeout_s is not None else self.timeout_s
            try:
                return await asyncio.wait_for(future, limit)
            except TimeoutError:
                raise ReplyTimeout(
                    f"no reply to {routing_key} within {limit:g} s; is a worker running?"
                ) from None
        finally:
            self._waiting.pop(correlation_id, None)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._waiting.get(message.correlation_id or "")
        if future is not None and not future.done():
            future.set_result(message)


def _command_body(command: CreateJob | Mapping[str, Any], wait: int | None) -> dict[str, Any]:
    if isinstance(command, CreateJob):
        # Unset fields are left out so that the worker applies its own defaults.
        body = command.model_dump(mode="json", exclude_unset=True, by_alias=True)
    else:
        body = dict(command)
    if wait is not None:
        body["wait"] = wait
    body.setdefault("id", str(uuid6.uuid7()))
    return body


def _job_from(reply: AbstractIncomingMessage) -> Job:
    payload = json.loads(reply.body)
    if reply.type == "job.rejected":
        status = (reply.headers or {}).get("x-status", 400)
        raise JobRejected(
            Error.model_validate(payload), int(status) if isinstance(status, int) else 400
        )
    return Job.model_validate(payload)


def create_job_sync(
    command: CreateJob | Mapping[str, Any],
    *,
    url: str = "amqp://guest:guest@127.0.0.1:5672/",
    namespace: str = "transform",
    wait: int | None = None,
    timeout_s: float = 60.0,
) -> Job:
    """Publish one create-job command and return the job from its reply, for scripts.

    Opens and closes a connection per call, so it suits a script or a cron job, not a
    service sending many commands: use ``JobsClient`` there. Raises ``JobRejected`` and
    ``ReplyTimeout`` like ``JobsClient.create_job``.
    """

    async def call() -> Job:
        async with JobsClient(url, namespace=namespace, timeout_s=timeout_s) as client:
            return await client.create_job(command, wait=wait)

    return asyncio.run(call())


def get_job_sync(
    *,
    id: str | None = None,
    key: str | None = None,
    workspace_id: str | None = None,
    url: str = "amqp://guest:guest@127.0.0.1:5672/",
    namespace: str = "transform",
    timeout_s: float = 30.0,
) -> Job:
    """Fetch one job by id or key, for scripts; see ``create_job_sync``."""

    async def call() -> Job:
        async with JobsClient(url, namespace=namespace, timeout_s=timeout_s) as client:
            return await client.get_job(id=id, key=key, workspace_id=workspace_id)

    return asyncio.run(call())
