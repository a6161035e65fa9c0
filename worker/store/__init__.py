"""Storage backends behind one ``Store`` protocol."""

from __future__ import annotations

from worker.store.base import InsertResult, InsertStatus, Store, StoredFile

__all__ = ["InsertResult", "InsertStatus", "Store", "StoredFile", "create_store"]


def create_store(url: str, *, sqlite_synchronous: str = "full") -> Store:
    """Return an unopened store for ``url`` (``sqlite:///…``, ``mongodb://…``)."""
    if url.startswith("sqlite:///"):
        from worker.store.sqlite import SqliteStore

        sync = "normal" if sqlite_synchronous == "normal" else "full"
        return SqliteStore.from_url(url, synchronous=sync)
    if url.startswith(("mongodb://", "mongodb+srv://")):
        from worker.store.mongo import MongoStore

        return MongoStore.from_url(url)
    raise ValueError(f"unsupported store URL {url!r}; use sqlite:///… or mongodb://…")
