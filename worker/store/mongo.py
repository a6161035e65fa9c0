"""The MongoDB store, for production on a replica set.

Collections and the unique indexes that decide every uniqueness question:

- ``jobs``: ``_id`` is the job id. ``active_key`` is the job's key for as long as the
  job has it, under a unique partial index on ``(workspace_id, active_key)``.
- ``entries``: ``_id`` is ``"<workspace_id>/<id>"``, and ``key`` has a unique partial
  index per workspace. Workspace ids contain no ``/``, so the ``_id`` is unambiguous.
- ``workflows``: one document per version, unique on ``(workspace_id, id, version)``.
- ``sequences``: one document per number given, unique on ``(workspace_id, name,
  number)`` and on ``(workspace_id, name, entry_id)``.
- ``files.files`` and ``files.chunks``: attachment bytes in the GridFS layout.

Documents keep datetimes as BSON dates, which have millisecond precision like the
records' timestamps. No method uses a transaction, so a job and its silo entry are
written by two operations. ``insert_job`` and ``replace_job`` say what that means.

Requires MongoDB 5.0 or later, because GOBL envelopes contain ``$``-prefixed keys
(``$schema``, ``$regime``), which older servers reject in stored documents.

NOTE: this store has passed the contract suite on the mongomock-motor emulator only,
which runs no server and no concurrent operations. Set ``TRANSFORM_TEST_MONGO_URL`` to
run the same suite against a real server.

NOTE: these guarantees need unsharded collections. On a sharded collection MongoDB
creates a unique index only when it starts with the shard key and keeps ``_id`` unique
only per shard, so no shard key of ``jobs`` keeps both the job id and the key unique.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import ConfigurationError, DuplicateKeyError, PyMongoError

from contracts.timestamps import utc_now
from worker.errors import StoreUnavailable
from worker.models import EntryRecord, JobRecord, WorkflowRecord
from worker.store.base import InsertResult, InsertStatus, StoredFile

Document = dict[str, Any]

#: Database used when neither the URL path nor the caller names one.
DEFAULT_DATABASE = "transform"
#: GridFS bucket of the attachment bytes: collections ``files.files`` and ``files.chunks``.
FILES_BUCKET = "files"
#: GridFS chunk size: 255 KiB, the default of PyMongo's ``gridfs`` (``DEFAULT_CHUNK_SIZE``).
CHUNK_SIZE_BYTES = 255 * 1024
#: Attempts at claiming the next number of a series. An attempt fails only when another
#: request claimed that number (or numbered the same entry) meanwhile, so running out
#: takes that many claims by others during one call. The caller then gets
#: StoreUnavailable and retries later.
MAX_NUMBER_ATTEMPTS = 100


class MongoStore:
    """A ``Store`` on one MongoDB database.

    Args:
        client: a ``pymongo.AsyncMongoClient``, or an object with the same methods
            such as mongomock-motor's ``AsyncMongoMockClient``. The store closes it.
        database: name of the database that contains the collections.
    """

    def __init__(self, client: AsyncMongoClient[Document], database: str) -> None:
        self._client = client
        self.database_name = database
        self._closed = False
        db = client.get_database(database)
        self._db = db
        self._jobs: AsyncCollection[Document] = db.get_collection("jobs")
        self._entries: AsyncCollection[Document] = db.get_collection("entries")
        self._workflows: AsyncCollection[Document] = db.get_collection("workflows")
        self._sequences: AsyncCollection[Document] = db.get_collection("sequences")
        self._files: AsyncCollection[Document] = db.get_collection(f"{FILES_BUCKET}.files")
        self._chunks: AsyncCollection[Document] = db.get_collection(f"{FILES_BUCKET}.chunks")

    @classmethod
    def from_url(cls, url: str, *, database: str | None = None) -> MongoStore:
        """Create a store for a ``mongodb://`` or ``mongodb+srv://`` URL.

        The database is ``database`` when given, else the one in the URL path, else
        ``transform``. No connection is made until the first operation.

        Raises:
            ValueError: the URL is not a valid MongoDB connection string.
        """
        try:
            client: AsyncMongoClient[Document] = AsyncMongoClient(url, tz_aware=True)
        except (ConfigurationError, ValueError) as exc:
            # PyMongo 4.20's URI errors name the faulty part but not the credentials.
            raise ValueError(f"invalid MongoDB URL: {exc}") from exc
        if database is None:
            database = client.get_default_database(default=DEFAULT_DATABASE).name
        return cls(client, database)

    # Lifecycle

    async def open(self) -> None:
        """Create the indexes that are missing. Creating an existing index does nothing."""
        with _translate_errors("create indexes"):
            await self._jobs.create_index(
                [("workspace_id", ASCENDING), ("active_key", ASCENDING)],
                unique=True,
                partialFilterExpression={"active_key": {"$type": "string"}},
            )
            await self._jobs.create_index([("due_at", ASCENDING)])
            await self._jobs.create_index([("outbox_due_at", ASCENDING)])
            await self._entries.create_index(
                [("workspace_id", ASCENDING), ("key", ASCENDING)],
                unique=True,
                partialFilterExpression={"key": {"$type": "string"}},
            )
            await self._workflows.create_index(
                [("workspace_id", ASCENDING), ("id", ASCENDING), ("version", ASCENDING)],
                unique=True,
            )
            await self._workflows.create_index(
                [("workspace_id", ASCENDING), ("id", ASCENDING), ("put_seq", DESCENDING)]
            )
            await self._sequences.create_index(
                [("workspace_id", ASCENDING), ("name", ASCENDING), ("number", ASCENDING)],
                unique=True,
            )
            await self._sequences.create_index(
                [("workspace_id", ASCENDING), ("name", ASCENDING), ("entry_id", ASCENDING)],
                unique=True,
            )
            # The two indexes that PyMongo's gridfs creates, with the same keys and options.
            await self._files.create_index([("filename", ASCENDING), ("uploadDate", ASCENDING)])
            await self._chunks.create_index(
                [("files_id", ASCENDING), ("n", ASCENDING)], unique=True
            )

    async def close(self) -> None:
        """Close the client. A second call does nothing."""
        if self._closed:
            return
        self._closed = True
        # AsyncMongoClient.close is a coroutine, but the emulator's close is a plain method.
        result = self._client.close()
        if inspect.isawaitable(result):
            await result

    async def ping(self) -> None:
        with _translate_errors("ping"):
            await self._db.command("ping")

    async def drop_database(self) -> None:
        """Delete the store's database with everything in it (for tests)."""
        with _translate_errors(f"drop database {self.database_name}"):
            await self._client.drop_database(self.database_name)

    # Jobs

    async def insert_job(
        self, job: JobRecord, *, key_taken_since: datetime, entry: EntryRecord | None = None
    ) -> InsertResult:
        """Insert a new job, and ``entry`` with it when given.

        The entry is inserted first. When the job insert then hits a unique index, the
        entry is deleted again (only while it still has rev 0), so the result is the
        same as SQLite's single transaction. This is a compensation, not a transaction:
        other readers can see the entry until it is deleted, and an outage or crash
        between the two inserts leaves the entry without its job.
        """
        with _translate_errors(f"insert job {job.id}"):
            if entry is not None:
                taken = await self._insert_entry(entry)
                if taken is not None:
                    return InsertResult(InsertStatus.ENTRY_TAKEN, entry=taken)

            if job.key is not None:
                # A key taken before the cutoff is free again: its holder gives it up.
                await self._jobs.update_one(
                    {
                        "workspace_id": job.workspace_id,
                        "active_key": job.key,
                        "created_at": {"$lt": key_taken_since},
                    },
                    {"$unset": {"active_key": ""}},
                )

            try:
                await self._jobs.insert_one(_job_document(job))
            except DuplicateKeyError as exc:
                if entry is not None:
                    await self._entries.delete_one(
                        {"_id": _scoped_id(entry.workspace_id, entry.id), "rev": 0}
                    )
                return await self._job_conflict(job, exc)
        return InsertResult(InsertStatus.CREATED)

    async def _job_conflict(self, job: JobRecord, exc: DuplicateKeyError) -> InsertResult:
        # The insert has decided, and these reads only fetch the holder for the reply.
        # The failed index comes first, but both are tried because the emulator can
        # name the wrong index when the job id collides.
        by_id: Document = {"_id": job.id}
        by_key: Document | None = None
        if job.key is not None:
            by_key = {"workspace_id": job.workspace_id, "active_key": job.key}
        order = [("key", by_key), ("id", by_id)]
        if "active_key" not in _failed_index_fields(exc):
            order.reverse()

        for kind, query in order:
            if query is None:
                continue
            doc = await self._jobs.find_one(query)
            if doc is not None:
                status = InsertStatus.KEY_TAKEN if kind == "key" else InsertStatus.ID_TAKEN
                return InsertResult(status, _job_from_document(doc))
        raise StoreUnavailable(
            f"job {job.id} violated a unique index but no holder was found, so retry the insert"
        )

    async def get_job(self, job_id: str) -> JobRecord | None:
        with _translate_errors(f"read job {job_id}"):
            doc = await self._jobs.find_one({"_id": job_id})
        return None if doc is None else _job_from_document(doc)

    async def get_job_by_key(self, workspace_id: str, key: str) -> JobRecord | None:
        with _translate_errors(f"read job by key in workspace {workspace_id}"):
            doc = await self._jobs.find_one({"workspace_id": workspace_id, "active_key": key})
        return None if doc is None else _job_from_document(doc)

    async def replace_job(
        self,
        job: JobRecord,
        *,
        expected_rev: int,
        entry: EntryRecord | None = None,
        expected_entry_rev: int | None = None,
    ) -> bool:
        """Store ``job`` if the stored one still has ``expected_rev``; return whether it did.

        The job's fields are set rather than the document replaced, so ``active_key``
        stays as it is. A job whose key expired and went to a newer job must not take
        it back.

        With ``entry``, the entry is replaced first and the job is not touched when the
        entry's rev differs. When the job's rev differs, the entry's previous version
        is put back (unless it changed again meanwhile), which is a compensation, not a
        transaction: readers can see the new entry until then, and an outage or crash
        in between leaves it. A new entry key that another entry has raises
        ``pymongo.errors.DuplicateKeyError``, as in ``replace_entry``.
        """
        if entry is not None and expected_entry_rev is None:
            raise ValueError("expected_entry_rev is required with entry")

        with _translate_errors(f"replace job {job.id}"):
            previous_entry: Document | None = None
            if entry is not None:
                previous_entry = await self._entries.find_one_and_replace(
                    {"_id": _scoped_id(entry.workspace_id, entry.id), "rev": expected_entry_rev},
                    _entry_document(entry),
                    return_document=ReturnDocument.BEFORE,
                )
                if previous_entry is None:
                    return False

            fields = _job_document(job)
            del fields["_id"]
            fields.pop("active_key", None)
            result = await self._jobs.update_one(
                {"_id": job.id, "rev": expected_rev}, {"$set": fields}
            )
            if result.matched_count == 1:
                return True

            if entry is not None and previous_entry is not None:
                await self._entries.replace_one(
                    {"_id": previous_entry["_id"], "rev": entry.rev}, previous_entry
                )
        return False

    async def due_jobs(self, now: datetime, limit: int) -> list[JobRecord]:
        return await self._due("due_at", now, limit)

    async def due_outboxes(self, now: datetime, limit: int) -> list[JobRecord]:
        return await self._due("outbox_due_at", now, limit)

    async def _due(self, field: str, now: datetime, limit: int) -> list[JobRecord]:
        # MongoDB reads a limit of 0 as "no limit".
        if limit <= 0:
            return []
        with _translate_errors(f"read jobs by {field}"):
            cursor = self._jobs.find({field: {"$lte": now}}).sort(field, ASCENDING).limit(limit)
            docs = await cursor.to_list(None)
        return [_job_from_document(doc) for doc in docs]

    # Silo entries

    async def insert_entry(self, entry: EntryRecord) -> EntryRecord | None:
        with _translate_errors(f"insert entry {entry.id}"):
            return await self._insert_entry(entry)

    async def _insert_entry(self, entry: EntryRecord) -> EntryRecord | None:
        try:
            await self._entries.insert_one(_entry_document(entry))
        except DuplicateKeyError as exc:
            return await self._entry_conflict(entry, exc)
        return None

    async def _entry_conflict(self, entry: EntryRecord, exc: DuplicateKeyError) -> EntryRecord:
        # As for jobs: the failed index first, then the other one.
        queries: list[Document] = [{"_id": _scoped_id(entry.workspace_id, entry.id)}]
        if entry.key is not None:
            by_key = {"workspace_id": entry.workspace_id, "key": entry.key}
            if "key" in _failed_index_fields(exc):
                queries.insert(0, by_key)
            else:
                queries.append(by_key)

        for query in queries:
            doc = await self._entries.find_one(query)
            if doc is not None:
                return _entry_from_document(doc)
        # insert_job deletes an entry again when its job could not be inserted.
        raise StoreUnavailable(
            f"entry {entry.id} violated a unique index but no holder was found, so retry the insert"
        )

    async def get_entry(self, workspace_id: str, entry_id: str) -> EntryRecord | None:
        with _translate_errors(f"read entry {entry_id}"):
            doc = await self._entries.find_one({"_id": _scoped_id(workspace_id, entry_id)})
        return None if doc is None else _entry_from_document(doc)

    async def replace_entry(self, entry: EntryRecord, *, expected_rev: int) -> bool:
        """Store ``entry`` if the stored one still has ``expected_rev``.

        Raises ``pymongo.errors.DuplicateKeyError`` when the entry's new key is held by
        another entry of the workspace.
        """
        with _translate_errors(f"replace entry {entry.id}"):
            result = await self._entries.replace_one(
                {"_id": _scoped_id(entry.workspace_id, entry.id), "rev": expected_rev},
                _entry_document(entry),
            )
        return result.matched_count == 1

    # Workflows

    async def put_workflow(self, record: WorkflowRecord) -> None:
        """Store a workflow version and make it the current one of its id.

        The current version is the one with the greatest ``put_seq``, which is the
        wall-clock time of the put in nanoseconds. So with several machines, puts of
        one workflow less than a clock skew apart may end in either order.
        """
        query = {"workspace_id": record.workspace_id, "id": record.id, "version": record.version}
        update = {
            "$set": {"put_seq": time.time_ns()},
            # A version that exists already keeps its stored content.
            "$setOnInsert": {
                "workflow": record.workflow.model_dump(mode="python", by_alias=True),
                "created_at": record.created_at,
            },
        }
        with _translate_errors(f"store workflow {record.id} version {record.version}"):
            try:
                await self._workflows.update_one(query, update, upsert=True)
            except DuplicateKeyError:
                # A concurrent put inserted this version first, so this update matches it.
                await self._workflows.update_one(query, update)

    async def get_workflow(
        self, workspace_id: str, workflow_id: str, version: str | None = None
    ) -> WorkflowRecord | None:
        query: Document = {"workspace_id": workspace_id, "id": workflow_id}
        with _translate_errors(f"read workflow {workflow_id}"):
            if version is not None:
                query["version"] = version
                doc = await self._workflows.find_one(query)
            else:
                cursor = self._workflows.find(query).sort("put_seq", DESCENDING).limit(1)
                docs = await cursor.to_list(None)
                doc = docs[0] if docs else None
        return None if doc is None else _workflow_from_document(doc)

    async def list_workflows(self, workspace_id: str) -> list[WorkflowRecord]:
        # Grouped here rather than with aggregate(), whose call differs between PyMongo
        # (a coroutine) and the emulator (a plain method). The first query reads only
        # ids and put_seq of every version; the second reads the current versions.
        with _translate_errors(f"list workflows of workspace {workspace_id}"):
            heads = await (
                self._workflows.find({"workspace_id": workspace_id}, {"id": 1, "put_seq": 1})
                .sort([("id", ASCENDING), ("put_seq", DESCENDING)])
                .to_list(None)
            )
            current: dict[str, Any] = {}
            for head in heads:
                current.setdefault(head["id"], head["_id"])
            docs = await self._workflows.find({"_id": {"$in": list(current.values())}}).to_list(
                None
            )
        docs.sort(key=lambda doc: str(doc["id"]))
        return [_workflow_from_document(doc) for doc in docs]

    # Sequences

    async def assign_number(
        self, workspace_id: str, series: str, entry_id: str, *, start: int
    ) -> int:
        series_query = {"workspace_id": workspace_id, "name": series}
        with _translate_errors(f"assign a number of series {series} to entry {entry_id}"):
            for _ in range(MAX_NUMBER_ATTEMPTS):
                given = await self._sequences.find_one({**series_query, "entry_id": entry_id})
                if given is not None:
                    return int(given["number"])

                cursor = self._sequences.find(series_query).sort("number", DESCENDING).limit(1)
                last = await cursor.to_list(None)
                number = int(last[0]["number"]) + 1 if last else start
                try:
                    # The insert is the atomic decision: the unique (series, number)
                    # index gives each number to one entry, and the unique (series,
                    # entry) index gives each entry one number. A number is only ever
                    # claimed as max + 1, so the series has no gap.
                    await self._sequences.insert_one(
                        {
                            **series_query,
                            "number": number,
                            "entry_id": entry_id,
                            "assigned_at": utc_now(),
                        }
                    )
                except DuplicateKeyError:
                    # Another request took this number (the next attempt reads the new
                    # max), or numbered this entry (the next lookup returns its number).
                    continue
                return number
        raise StoreUnavailable(
            f"no number of series {series} could be assigned to entry {entry_id} after "
            f"{MAX_NUMBER_ATTEMPTS} attempts because of concurrent requests, so retry later"
        )

    # Files

    async def put_file(self, file: StoredFile) -> None:
        """Store attachment bytes under ``(workspace_id, id)``; an existing id is kept.

        The bytes are written in the GridFS layout of bucket ``files`` with the
        ``_id`` ``"<workspace_id>/<id>"``, so any GridFS tool can read them. Chunks come
        first and the ``files.files`` document last, so a file that has a ``files.files``
        document is complete.

        NOTE: two concurrent puts of different bytes under one id can mix their chunks;
        the store relies on each id naming one content.
        """
        file_id = _scoped_id(file.workspace_id, file.id)
        with _translate_errors(f"store file {file.id}"):
            if await self._files.find_one({"_id": file_id}, {"_id": 1}) is not None:
                return

            offsets = range(0, len(file.data), CHUNK_SIZE_BYTES)
            for n, offset in enumerate(offsets):
                chunk = {
                    "files_id": file_id,
                    "n": n,
                    "data": file.data[offset : offset + CHUNK_SIZE_BYTES],
                }
                try:
                    await self._chunks.replace_one(
                        {"files_id": file_id, "n": n}, chunk, upsert=True
                    )
                except DuplicateKeyError:
                    # A concurrent put of this file created the chunk first.
                    continue
            # Chunks past the end can be left by an earlier put that stopped before
            # writing its files document.
            await self._chunks.delete_many({"files_id": file_id, "n": {"$gte": len(offsets)}})

            try:
                await self._files.insert_one(
                    {
                        "_id": file_id,
                        "length": len(file.data),
                        "chunkSize": CHUNK_SIZE_BYTES,
                        "uploadDate": utc_now(),
                        "filename": file.name,
                        "metadata": {
                            "workspace_id": file.workspace_id,
                            "id": file.id,
                            "mime": file.mime,
                        },
                    }
                )
            except DuplicateKeyError:
                # A concurrent put of this file finished first; its document is kept.
                return

    async def get_file(self, workspace_id: str, file_id: str) -> StoredFile | None:
        stored_id = _scoped_id(workspace_id, file_id)
        with _translate_errors(f"read file {file_id}"):
            meta = await self._files.find_one({"_id": stored_id})
            if meta is None:
                return None
            cursor = self._chunks.find({"files_id": stored_id}).sort("n", ASCENDING)
            chunks = await cursor.to_list(None)

        data = b"".join(bytes(chunk["data"]) for chunk in chunks)
        numbers = [chunk["n"] for chunk in chunks]
        if len(data) != meta["length"] or numbers != list(range(len(chunks))):
            # NOTE: reported as StoreUnavailable because the error tree has no permanent
            # store error, although retrying does not repair the file.
            raise StoreUnavailable(
                f"file {stored_id} in GridFS bucket {FILES_BUCKET!r} is corrupt: expected "
                f"{meta['length']} bytes, found {len(data)} in {len(chunks)} chunks; "
                "delete it or restore it from a backup"
            )
        metadata = meta.get("metadata") or {}
        return StoredFile(
            workspace_id,
            file_id,
            str(meta.get("filename", "")),
            str(metadata.get("mime", "application/octet-stream")),
            data,
        )


@contextmanager
def _translate_errors(operation: str) -> Iterator[None]:
    """Raise StoreUnavailable for every PyMongo error but DuplicateKeyError.

    DuplicateKeyError passes through because the callers read it as a decision of a
    unique index.
    """
    try:
        yield
    except DuplicateKeyError:
        raise
    except PyMongoError as exc:
        # The message adds the operation but no URL, so no credentials.
        raise StoreUnavailable(f"MongoDB failed to {operation}: {exc}") from exc


def _failed_index_fields(exc: DuplicateKeyError) -> frozenset[str]:
    """Return the fields of the unique index that rejected a write, or none if unknown."""
    details = exc.details or {}
    pattern = details.get("keyPattern")
    return frozenset(pattern) if isinstance(pattern, Mapping) else frozenset()


def _scoped_id(workspace_id: str, item_id: str) -> str:
    return f"{workspace_id}/{item_id}"


def _job_document(job: JobRecord) -> Document:
    doc = job.model_dump(mode="python")
    doc["_id"] = doc.pop("id")
    if job.key is not None:
        doc["active_key"] = job.key
    return doc


def _job_from_document(doc: Mapping[str, Any]) -> JobRecord:
    fields = {name: value for name, value in doc.items() if name not in ("_id", "active_key")}
    fields["id"] = doc["_id"]
    return JobRecord.model_validate(fields)


def _entry_document(entry: EntryRecord) -> Document:
    doc = entry.model_dump(mode="python")
    doc["_id"] = _scoped_id(entry.workspace_id, entry.id)
    return doc


def _entry_from_document(doc: Mapping[str, Any]) -> EntryRecord:
    return EntryRecord.model_validate({name: value for name, value in doc.items() if name != "_id"})


def _workflow_from_document(doc: Mapping[str, Any]) -> WorkflowRecord:
    return WorkflowRecord.model_validate(
        {"workflow": doc["workflow"], "version": doc["version"], "created_at": doc["created_at"]}
    )
