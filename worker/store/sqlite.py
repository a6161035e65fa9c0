"""The embedded store: one SQLite file, for one machine, development, the demo and CI.

Database calls run on two threads that own the connections (see ``sqlite_threads``),
so the event loop never blocks on disk: writes are group-committed on one, reads run
on the other. Writes use ``BEGIN IMMEDIATE`` so that several worker processes sharing
the file serialise on SQLite's write lock instead of failing on a lock upgrade. The
file is in WAL mode; ``synchronous=FULL`` (the default) makes every commit survive a
power cut, ``normal`` survives a process crash only.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Literal, TypeVar

from contracts.timestamps import format_timestamp, utc_now
from worker.errors import StoreUnavailable
from worker.models import EntryRecord, JobRecord, WorkflowRecord
from worker.store.base import InsertResult, InsertStatus, StoredFile
from worker.store.sqlite_threads import ConnectionThread, connect

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    workspace_id TEXT NOT NULL,
    active_key TEXT UNIQUE,
    created_at TEXT NOT NULL,
    due_at TEXT,
    outbox_due_at TEXT,
    rev INTEGER NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_due_at ON jobs (due_at) WHERE due_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_outbox_due_at ON jobs (outbox_due_at)
    WHERE outbox_due_at IS NOT NULL;

CREATE TABLE IF NOT EXISTS entries (
    workspace_id TEXT NOT NULL,
    id TEXT NOT NULL,
    active_key TEXT UNIQUE,
    rev INTEGER NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (workspace_id, id)
);

CREATE TABLE IF NOT EXISTS workflows (
    workspace_id TEXT NOT NULL,
    id TEXT NOT NULL,
    version TEXT NOT NULL,
    put_seq INTEGER NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (workspace_id, id, version)
);

CREATE TABLE IF NOT EXISTS sequences (
    workspace_id TEXT NOT NULL,
    name TEXT NOT NULL,
    number INTEGER NOT NULL,
    entry_id TEXT NOT NULL,
    assigned_at TEXT NOT NULL,
    PRIMARY KEY (workspace_id, name, number),
    UNIQUE (workspace_id, name, entry_id)
);

CREATE TABLE IF NOT EXISTS files (
    workspace_id TEXT NOT NULL,
    id TEXT NOT NULL,
    name TEXT NOT NULL,
    mime TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (workspace_id, id)
);
"""

Synchronous = Literal["full", "normal"]


def path_from_url(url: str) -> Path:
    """Return the file path of a ``sqlite:///relative`` or ``sqlite:////absolute`` URL."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise ValueError(f"{url!r} is not a SQLite URL; expected sqlite:///path/to/file.db")
    return Path(url[len(prefix) :])


def _key(workspace_id: str, key: str | None) -> str | None:
    # The NUL separator cannot appear in a workspace id, so keys of two workspaces
    # never collide in the single unique column.
    return None if key is None else f"{workspace_id}\x00{key}"


def _time(value: datetime | None) -> str | None:
    return None if value is None else format_timestamp(value)


class SqliteStore:
    """A ``Store`` on one SQLite file."""

    def __init__(
        self, path: Path, *, synchronous: Synchronous = "full", busy_timeout_s: float = 10.0
    ) -> None:
        self.path = path
        self._synchronous = synchronous
        self._busy_timeout_s = busy_timeout_s
        self._writer: ConnectionThread | None = None
        self._reader: ConnectionThread | None = None

    @classmethod
    def from_url(
        cls, url: str, *, synchronous: Synchronous = "full", busy_timeout_s: float = 10.0
    ) -> SqliteStore:
        return cls(path_from_url(url), synchronous=synchronous, busy_timeout_s=busy_timeout_s)

    # Plumbing

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read on the reader connection."""
        return await self._submit(self._reader, fn)

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a write in the writer's next group commit; return once it is durable."""
        return await self._submit(self._writer, fn)

    async def _submit(
        self, thread: ConnectionThread | None, fn: Callable[[sqlite3.Connection], T]
    ) -> T:
        if thread is None:
            raise RuntimeError("the SQLite store is not open; call open() first")
        try:
            result: T = await thread.submit(fn)
        except sqlite3.IntegrityError:
            raise
        except sqlite3.DatabaseError as exc:
            raise StoreUnavailable(f"SQLite {self.path}: {exc}") from exc
        return result

    async def open(self) -> None:
        if self._writer is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create the folder of {self.path}: {exc}") from exc

        def connect_both() -> tuple[sqlite3.Connection, sqlite3.Connection]:
            writer = connect(self.path, self._synchronous, self._busy_timeout_s)
            writer.executescript(SCHEMA)
            return writer, connect(self.path, self._synchronous, self._busy_timeout_s)

        try:
            writer, reader = await asyncio.to_thread(connect_both)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open SQLite file {self.path}: {exc}") from exc
        self._writer = ConnectionThread(writer, "sqlite-writer", group_commit=True)
        self._reader = ConnectionThread(reader, "sqlite-reader", group_commit=False)

    async def close(self) -> None:
        threads = [self._writer, self._reader]
        self._writer = None
        self._reader = None
        for thread in threads:
            if thread is not None:
                await asyncio.to_thread(thread.close)

    async def ping(self) -> None:
        await self._run(lambda conn: conn.execute("SELECT 1").fetchone())

    # Jobs

    async def insert_job(
        self, job: JobRecord, *, key_taken_since: datetime, entry: EntryRecord | None = None
    ) -> InsertResult:
        active_key = _key(job.workspace_id, job.key)
        cutoff = format_timestamp(key_taken_since)
        row = (
            job.id,
            job.workspace_id,
            active_key,
            format_timestamp(job.created_at),
            _time(job.due_at),
            _time(job.outbox_due_at),
            job.rev,
            job.model_dump_json(),
        )

        def insert(conn: sqlite3.Connection) -> InsertResult:
            if active_key is not None:
                # A key taken before the cutoff is free again: its holder gives it up.
                conn.execute(
                    "UPDATE jobs SET active_key = NULL WHERE active_key = ? AND created_at < ?",
                    (active_key, cutoff),
                )
            if entry is not None:
                taken = _insert_entry_row(conn, entry)
                if taken is not None:
                    raise _Conflict(InsertResult(InsertStatus.ENTRY_TAKEN, entry=taken))
            try:
                conn.execute("INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
            except sqlite3.IntegrityError:
                # The unique indexes decided; find out which one, and roll back the entry.
                raise _Conflict(_job_conflict(conn, job.id, active_key)) from None
            return InsertResult(InsertStatus.CREATED)

        try:
            return await self._write(insert)
        except _Conflict as conflict:
            assert conflict.result is not None
            return conflict.result

    async def get_job(self, job_id: str) -> JobRecord | None:
        row = await self._run(
            lambda conn: conn.execute("SELECT doc FROM jobs WHERE id = ?", (job_id,)).fetchone()
        )
        return None if row is None else JobRecord.model_validate_json(row[0])

    async def get_job_by_key(self, workspace_id: str, key: str) -> JobRecord | None:
        active_key = _key(workspace_id, key)
        row = await self._run(
            lambda conn: conn.execute(
                "SELECT doc FROM jobs WHERE active_key = ?", (active_key,)
            ).fetchone()
        )
        return None if row is None else JobRecord.model_validate_json(row[0])

    async def replace_job(
        self,
        job: JobRecord,
        *,
        expected_rev: int,
        entry: EntryRecord | None = None,
        expected_entry_rev: int | None = None,
    ) -> bool:
        doc = job.model_dump_json()
        params = (
            _time(job.due_at),
            _time(job.outbox_due_at),
            job.rev,
            doc,
            job.id,
            expected_rev,
        )

        def replace(conn: sqlite3.Connection) -> bool:
            if entry is not None:
                if expected_entry_rev is None:
                    raise ValueError("expected_entry_rev is required with entry")
                if not _replace_entry_row(conn, entry, expected_entry_rev):
                    return False
            cursor = conn.execute(
                "UPDATE jobs SET due_at = ?, outbox_due_at = ?, rev = ?, doc = ? "
                "WHERE id = ? AND rev = ?",
                params,
            )
            if cursor.rowcount != 1:
                if entry is not None:
                    # Undo the entry write: the job and its entry change together or not at all.
                    raise _Conflict(None)
                return False
            return True

        try:
            return await self._write(replace)
        except _Conflict:
            return False

    async def due_jobs(self, now: datetime, limit: int) -> list[JobRecord]:
        rows = await self._run(
            lambda conn: conn.execute(
                "SELECT doc FROM jobs WHERE due_at <= ? ORDER BY due_at LIMIT ?",
                (format_timestamp(now), limit),
            ).fetchall()
        )
        return [JobRecord.model_validate_json(row[0]) for row in rows]

    async def due_outboxes(self, now: datetime, limit: int) -> list[JobRecord]:
        rows = await self._run(
            lambda conn: conn.execute(
                "SELECT doc FROM jobs WHERE outbox_due_at <= ? ORDER BY outbox_due_at LIMIT ?",
                (format_timestamp(now), limit),
            ).fetchall()
        )
        return [JobRecord.model_validate_json(row[0]) for row in rows]

    # Silo entries

    async def insert_entry(self, entry: EntryRecord) -> EntryRecord | None:
        return await self._write(lambda conn: _insert_entry_row(conn, entry))

    async def get_entry(self, workspace_id: str, entry_id: str) -> EntryRecord | None:
        row = await self._run(
            lambda conn: conn.execute(
                "SELECT doc FROM entries WHERE workspace_id = ? AND id = ?",
                (workspace_id, entry_id),
            ).fetchone()
        )
        return None if row is None else EntryRecord.model_validate_json(row[0])

    async def replace_entry(self, entry: EntryRecord, *, expected_rev: int) -> bool:
        return await self._write(lambda conn: _replace_entry_row(conn, entry, expected_rev))

    # Workflows

    async def put_workflow(self, record: WorkflowRecord) -> None:
        doc = record.model_dump_json(by_alias=True)
        params = (record.workspace_id, record.id, record.version, time.time_ns(), doc)
        await self._write(
            lambda conn: conn.execute(
                "INSERT INTO workflows VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (workspace_id, id, version) DO UPDATE SET put_seq = excluded.put_seq",
                params,
            )
        )

    async def get_workflow(
        self, workspace_id: str, workflow_id: str, version: str | None = None
    ) -> WorkflowRecord | None:
        if version is None:
            sql = (
                "SELECT doc FROM workflows WHERE workspace_id = ? AND id = ? "
                "ORDER BY put_seq DESC LIMIT 1"
            )
            params: tuple[str, ...] = (workspace_id, workflow_id)
        else:
            sql = "SELECT doc FROM workflows WHERE workspace_id = ? AND id = ? AND version = ?"
            params = (workspace_id, workflow_id, version)
        row = await self._run(lambda conn: conn.execute(sql, params).fetchone())
        return None if row is None else WorkflowRecord.model_validate_json(row[0])

    async def list_workflows(self, workspace_id: str) -> list[WorkflowRecord]:
        rows = await self._run(
            lambda conn: conn.execute(
                "SELECT doc FROM workflows AS w WHERE workspace_id = ? AND put_seq = "
                "(SELECT MAX(put_seq) FROM workflows WHERE workspace_id = w.workspace_id "
                "AND id = w.id) ORDER BY id",
                (workspace_id,),
            ).fetchall()
        )
        return [WorkflowRecord.model_validate_json(row[0]) for row in rows]

    # Sequences

    async def assign_number(
        self, workspace_id: str, series: str, entry_id: str, *, start: int
    ) -> int:
        def assign(conn: sqlite3.Connection) -> int:
            # INSERT … SELECT computes the next number and claims it in one statement.
            # The unique (series, entry) index turns a second request for the same
            # entry into a no-op, so the row found below is the number given before.
            conn.execute(
                "INSERT INTO sequences (workspace_id, name, number, entry_id, assigned_at) "
                "SELECT ?, ?, COALESCE(MAX(number) + 1, ?), ?, ? FROM sequences "
                "WHERE workspace_id = ? AND name = ? "
                "ON CONFLICT (workspace_id, name, entry_id) DO NOTHING",
                (
                    workspace_id,
                    series,
                    start,
                    entry_id,
                    format_timestamp(utc_now()),
                    workspace_id,
                    series,
                ),
            )
            row = conn.execute(
                "SELECT number FROM sequences WHERE workspace_id = ? AND name = ? AND entry_id = ?",
                (workspace_id, series, entry_id),
            ).fetchone()
            return int(row[0])

        return await self._write(assign)

    # Files

    async def put_file(self, file: StoredFile) -> None:
        params = (file.workspace_id, file.id, file.name, file.mime, file.data)
        await self._write(
            lambda conn: conn.execute(
                "INSERT INTO files VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", params
            )
        )

    async def get_file(self, workspace_id: str, file_id: str) -> StoredFile | None:
        row = await self._run(
            lambda conn: conn.execute(
                "SELECT name, mime, data FROM files WHERE workspace_id = ? AND id = ?",
                (workspace_id, file_id),
            ).fetchone()
        )
        if row is None:
            return None
        return StoredFile(workspace_id, file_id, row[0], row[1], bytes(row[2]))


class _Conflict(Exception):
    """Raised inside a transaction to roll it back; carries what the caller returns."""

    def __init__(self, result: InsertResult | None) -> None:
        super().__init__("transaction rolled back")
        self.result = result


def _job_conflict(conn: sqlite3.Connection, job_id: str, active_key: str | None) -> InsertResult:
    row = conn.execute("SELECT doc FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is not None:
        return InsertResult(InsertStatus.ID_TAKEN, JobRecord.model_validate_json(row[0]))
    row = conn.execute("SELECT doc FROM jobs WHERE active_key = ?", (active_key,)).fetchone()
    if row is None:
        raise StoreUnavailable(f"job {job_id} violated a unique index but no holder was found")
    return InsertResult(InsertStatus.KEY_TAKEN, JobRecord.model_validate_json(row[0]))


def _insert_entry_row(conn: sqlite3.Connection, entry: EntryRecord) -> EntryRecord | None:
    try:
        conn.execute(
            "INSERT INTO entries VALUES (?, ?, ?, ?, ?)",
            (
                entry.workspace_id,
                entry.id,
                _key(entry.workspace_id, entry.key),
                entry.rev,
                entry.model_dump_json(),
            ),
        )
    except sqlite3.IntegrityError:
        row = conn.execute(
            "SELECT doc FROM entries WHERE (workspace_id = ? AND id = ?) OR active_key = ?",
            (entry.workspace_id, entry.id, _key(entry.workspace_id, entry.key)),
        ).fetchone()
        return None if row is None else EntryRecord.model_validate_json(row[0])
    return None


def _replace_entry_row(conn: sqlite3.Connection, entry: EntryRecord, expected_rev: int) -> bool:
    cursor = conn.execute(
        "UPDATE entries SET active_key = ?, rev = ?, doc = ? "
        "WHERE workspace_id = ? AND id = ? AND rev = ?",
        (
            _key(entry.workspace_id, entry.key),
            entry.rev,
            entry.model_dump_json(),
            entry.workspace_id,
            entry.id,
            expected_rev,
        ),
    )
    return cursor.rowcount == 1
