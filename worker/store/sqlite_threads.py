"""The threads that own the SQLite connections: one for writes, one for reads.

Writes are group-committed. The writer thread takes every write that is waiting, runs
each inside its own savepoint of one ``BEGIN IMMEDIATE`` transaction, and commits
once, so that many jobs share one fsync. A write that raises rolls back to its
savepoint only; the others still commit. Each write's future is resolved after the
commit, so a caller never sees a write that is not durable.

Reads run on a second connection, which in WAL mode reads every committed write
without waiting for the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Writes taken into one transaction at most; bounds the latency of the first one.
MAX_BATCH = 256

Operation = Callable[[sqlite3.Connection], Any]


def connect(path: Path, synchronous: str, busy_timeout_s: float = 10.0) -> sqlite3.Connection:
    """Open a connection in autocommit mode and WAL, waiting up to ``busy_timeout_s``
    for another process's lock before an operation fails with "database is locked"."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
    return conn


@dataclass
class _Job:
    operation: Operation
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    outcome: tuple[bool, Any] = field(default=(False, None))


def _settle(jobs: list[_Job]) -> None:
    for job in jobs:
        if job.future.done():
            continue
        ok, value = job.outcome
        if ok:
            job.future.set_result(value)
        else:
            job.future.set_exception(value)


class ConnectionThread:
    """A thread that owns one connection and runs operations on it in order."""

    def __init__(self, conn: sqlite3.Connection, name: str, *, group_commit: bool) -> None:
        self.conn = conn
        self._group_commit = group_commit
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, operation: Operation) -> asyncio.Future[Any]:
        """Queue an operation; the future resolves on the caller's event loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.put(_Job(operation, future, loop))
        return future

    def close(self) -> None:
        """Finish queued operations, close the connection and join the thread."""
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            stop = False
            while self._group_commit and len(batch) < MAX_BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            if self._group_commit:
                self._commit(batch)
            else:
                self._run(batch[0])
            self._deliver(batch)
            if stop:
                break
        self.conn.close()

    def _run(self, job: _Job) -> None:
        try:
            job.outcome = (True, job.operation(self.conn))
        except BaseException as exc:
            job.outcome = (False, exc)

    def _commit(self, batch: list[_Job]) -> None:
        conn = self.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in batch:
                conn.execute("SAVEPOINT write")
                self._run(job)
                if not job.outcome[0]:
                    conn.execute("ROLLBACK TO write")
                conn.execute("RELEASE write")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            # Nothing of the batch is durable, so every write of it failed.
            if conn.in_transaction:
                # An unusable connection fails here too; the next batch reports why.
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            for job in batch:
                job.outcome = (False, exc)

    def _deliver(self, batch: list[_Job]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
        for job in batch:
            by_loop.setdefault(job.loop, []).append(job)
        for loop, jobs in by_loop.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(_settle, jobs)
