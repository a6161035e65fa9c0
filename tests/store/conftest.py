"""One contract suite, run against every store backend.

SQLite always runs on a real file. MongoDB runs against the ``mongomock-motor``
emulator, which exercises the queries and update operators but not a server's
concurrency or transactions, and against a real server when
``TRANSFORM_TEST_MONGO_URL`` is set.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import uuid6

from worker.store.base import Store
from worker.store.sqlite import SqliteStore

BACKENDS = ["sqlite", "mongomock"]
if os.environ.get("TRANSFORM_TEST_MONGO_URL"):
    BACKENDS.append("mongodb")

StoreFactory = Callable[[], Store]


def _mongo_store(backend: str, database: str) -> Store:
    from worker.store.mongo import MongoStore

    if backend == "mongomock":
        from mongomock_motor import AsyncMongoMockClient

        return MongoStore(AsyncMongoMockClient(tz_aware=True), database)
    return MongoStore.from_url(os.environ["TRANSFORM_TEST_MONGO_URL"], database=database)


@pytest.fixture(params=BACKENDS)
async def store_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[StoreFactory]:
    """Return a factory of opened-on-demand stores that all share one database."""
    backend: str = request.param
    database = f"transform_test_{uuid6.uuid7().hex}"
    created: list[Store] = []
    shared_mock: list[Store] = []

    def make() -> Store:
        if backend == "sqlite":
            store: Store = SqliteStore(tmp_path / "store.db")
        elif backend == "mongomock":
            # The emulator keeps its data per client, so every store shares one.
            if not shared_mock:
                shared_mock.append(_mongo_store(backend, database))
            return shared_mock[0]
        else:
            store = _mongo_store(backend, database)
        created.append(store)
        return store

    yield make

    for store in created + shared_mock:
        if backend == "mongodb":
            await store.drop_database()  # type: ignore[attr-defined]
        await store.close()


@pytest.fixture
async def store(store_factory: StoreFactory) -> Store:
    opened = store_factory()
    await opened.open()
    return opened
