"""The Celery baseline: the bench workflow's three steps as one Celery task.

``bench.process(envelope, reply_to)`` does in one process what the bench workflow
does in transform-worker:

1. ``silo.state``: normalise the envelope (check its digest) and store it as an
   entry in state ``processing``.
2. ``sequence.enumerate``: take the next number of the ``invoices`` series in one
   ``BEGIN IMMEDIATE`` transaction, and set the document code to ``INV-00001`` etc.
3. ``silo.close``: recompute the digest with ``replace_document`` and sign the
   envelope with ``worker.gobl.signing.sign_envelope``, then store it.

Its return value (the code and the signed envelope) goes to a persistent SQLite result
backend. After Celery has stored it, ``on_success`` publishes the same value to the
``reply_to`` queue given as the task's argument, with a publisher confirm, so one load
generator measures publish-to-reply latency for every system. The task message itself
is published by the load generator, built by ``task_message`` in Celery's own protocol
version 2 format.

Settings come from environment variables set by ``run.py``:
``BENCH_AMQP_URL``, ``BENCH_CELERY_QUEUE`` (a prefixed queue name) and ``BENCH_DIR``
(folder of the result backend, the task's store and the signing key).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, ClassVar

import aio_pika
from celery import Celery, Task
from celery.worker.consumer import Consumer

from worker.gobl.envelope import normalise_envelope, replace_document
from worker.gobl.signing import SigningKey, load_or_create_key, sign_envelope

TASK_NAME = "bench.process"
SERIES = "invoices"

AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
QUEUE = os.environ.get("BENCH_CELERY_QUEUE", "bench.celery")
DATA_DIR = Path(os.environ.get("BENCH_DIR", "."))


class BenchConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer without the native delayed delivery step.

    With a quorum queue, Celery 5.5 and later declare 28 exchanges and queues with
    fixed names (``celery_delayed_0`` … ``celery_delayed_27``) for ETA tasks. They
    would be shared with everyone else on the broker, and the bench sends no ETA tasks.
    """

    class Blueprint(Consumer.Blueprint):  # type: ignore[misc]
        default_steps: ClassVar[list[str]] = [
            step
            for step in Consumer.Blueprint.default_steps
            if not step.endswith(":DelayedDelivery")
        ]


app = Celery("bench", broker=AMQP_URL, backend=f"db+sqlite:///{DATA_DIR / 'celery.db'}")
app.conf.update(
    task_default_queue=QUEUE,
    task_default_exchange=QUEUE,
    task_default_routing_key=QUEUE,
    task_default_queue_type="quorum",
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    task_acks_on_failure_or_timeout=True,
    # Every publish from the worker, the reply included, waits for the broker's confirm.
    broker_transport_options={"confirm_publish": True},
    broker_connection_retry_on_startup=True,
    worker_consumer=f"{__name__}:BenchConsumer",
    # No remote control, events or gossip: they would declare exchanges and queues
    # under Celery's fixed names, and the transform-worker has no counterpart.
    worker_enable_remote_control=False,
    worker_send_task_events=False,
    control_exchange=f"{QUEUE}.control",
    event_exchange=f"{QUEUE}.events",
    worker_hijack_root_logger=False,
)


class TaskStore:
    """The task's SQLite file: entries and number series, in WAL mode with synchronous=FULL.

    The settings match the transform-worker's SQLite store defaults, so both systems
    pay for the same durability. One store is opened per process, after the fork.
    """

    def __init__(self, path: Path) -> None:
        self.connection = sqlite3.connect(path, isolation_level=None, timeout=30.0)
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.execute("PRAGMA synchronous=FULL")
        self.connection.execute(
            "CREATE TABLE IF NOT EXISTS entries "
            "(id TEXT PRIMARY KEY, state TEXT NOT NULL, envelope TEXT NOT NULL)"
        )
        self.connection.execute(
            "CREATE TABLE IF NOT EXISTS series (name TEXT PRIMARY KEY, next INTEGER NOT NULL)"
        )

    def insert_entry(self, entry_id: str, state: str, envelope: dict[str, Any]) -> None:
        self.connection.execute(
            "INSERT INTO entries (id, state, envelope) VALUES (?, ?, ?)",
            (entry_id, state, json.dumps(envelope)),
        )

    def update_entry(self, entry_id: str, state: str, envelope: dict[str, Any]) -> None:
        self.connection.execute(
            "UPDATE entries SET state = ?, envelope = ? WHERE id = ?",
            (state, json.dumps(envelope), entry_id),
        )

    def next_number(self, series: str, start: int = 1) -> int:
        """Return the next number of ``series``; the write lock makes it gap-free."""
        cursor = self.connection.cursor()
        cursor.execute("BEGIN IMMEDIATE")
        try:
            cursor.execute(
                "INSERT OR IGNORE INTO series (name, next) VALUES (?, ?)", (series, start)
            )
            cursor.execute(
                "UPDATE series SET next = next + 1 WHERE name = ? RETURNING next - 1", (series,)
            )
            (number,) = cursor.fetchone()
            cursor.execute("COMMIT")
        except BaseException:
            cursor.execute("ROLLBACK")
            raise
        return int(number)


_local = threading.local()


def _store() -> TaskStore:
    store: TaskStore | None = getattr(_local, "store", None)
    if store is None:
        store = _local.store = TaskStore(DATA_DIR / "celery-store.db")
    return store


def _signing_key() -> SigningKey:
    key: SigningKey | None = getattr(_local, "key", None)
    if key is None:
        key, _ = load_or_create_key(None, DATA_DIR)
        _local.key = key
    return key


class ReplyingTask(Task):  # type: ignore[misc]
    """A task that publishes its result to the ``reply_to`` argument once it is stored.

    Celery calls ``on_success`` after the result backend has stored the return value,
    so a caller never gets a reply for a result that is not yet durable, as with the
    transform-worker's outbox.
    """

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        reply_to = args[1] if len(args) > 1 else kwargs.get("reply_to")
        if not reply_to:
            return
        with self.app.producer_or_acquire() as producer:
            producer.publish(
                retval,
                exchange="",
                routing_key=reply_to,
                serializer="json",
                correlation_id=task_id,
                delivery_mode=2,
                mandatory=True,
                type="bench.completed",
                retry=False,
            )


@app.task(bind=True, base=ReplyingTask, name=TASK_NAME, acks_late=True)  # type: ignore[untyped-decorator]
def process(self: Task, envelope: dict[str, Any], reply_to: str) -> dict[str, Any]:
    """Store, number and sign one envelope; return its code and the signed envelope."""
    entry_id = self.request.id
    store = _store()

    entry = normalise_envelope(envelope)
    store.insert_entry(entry_id, "processing", entry)

    number = store.next_number(SERIES)
    code = f"INV-{number:05d}"
    numbered = replace_document(entry, {**entry["doc"], "code": code})

    signed = sign_envelope(numbered, _signing_key())
    store.update_entry(entry_id, "signed", signed)
    return {"id": entry_id, "code": code, "envelope": signed}


# The task's body after the envelope: the reply queue, no kwargs, and the protocol's
# "embed" member (callbacks, errbacks, chain, chord).
_EMBED = json.dumps({"callbacks": None, "errbacks": None, "chain": None, "chord": None})


def task_message(
    task_id: str, envelope_json: bytes, reply_to: str, *, origin: str = "bench-load"
) -> aio_pika.Message:
    """Build the AMQP message that ``process.apply_async((envelope, reply_to))`` would publish.

    The headers come from Celery's own ``as_task_v2``. The body is the JSON array
    ``[[envelope, reply_to], {}, embed]``, spliced from the already encoded envelope so
    that the load generator does not encode every envelope again.
    """
    headers, properties, _, _ = app.amqp.as_task_v2(
        task_id,
        TASK_NAME,
        args=(),
        argsrepr="(envelope, reply_to)",
        kwargsrepr="{}",
        origin=origin,
    )
    body = b"[[" + envelope_json + b"," + json.dumps(reply_to).encode() + b"],{},"
    body += _EMBED.encode() + b"]"
    return aio_pika.Message(
        body,
        headers=headers,
        content_type="application/json",
        content_encoding="utf-8",
        correlation_id=properties["correlation_id"],
        message_id=task_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
