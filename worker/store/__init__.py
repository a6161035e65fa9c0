"""Storage backends behind one ``Store`` protocol."""

from __future__ import annotations

from worker.settings import Settings
from worker.store.base import InsertResult, InsertStatus, Store, StoredFile

__all__ = ["InsertResult", "InsertStatus", "Store", "StoredFile", "create_store"]


def create_store(settings: Settings) -> Store:
    """Return an unopened store for ``TRANSFORM_STORE_URL`` (``sqlite:///…``, ``mongodb://…``)."""
    url = settings.store_url
    if url.startswith("sqlite:///"):
        from worker.store.sqlite import SqliteStore

        return SqliteStore.from_url(
            url,
            synchronous=settings.sqlite_synchronous,
            busy_timeout_s=settings.sqlite_busy_timeout_s,
        )
    if url.startswith(("mongodb://", "mongodb+srv://")):
        from worker.store.mongo import MongoStore

        return MongoStore.from_url(url)
    scheme = url.split(":", 1)[0]
    raise ValueError(f"unsupported store URL scheme {scheme!r}; use sqlite:///… or mongodb://…")
