"""Storage backends behind one ``Store`` protocol."""

from __future__ import annotations

from worker.store.base import InsertResult, InsertStatus, Store, StoredFile

__all__ = ["InsertResult", "InsertStatus", "Store", "StoredFile", "create_store"]


def create_store(url: str, *, sqlite_synchronous: str = "full") -> Store:
    """Return an unopened store for ``url`` (``sqlite:///…``, ``mongodb://…``)."""
    if url.startswith("sqlite:///"):
        from worker.store.sqlite import SqliteStore

        if sqlite_synchronous == "normal":
            return SqliteStore.from_url(url, synchronous="normal")
        return SqliteStore.from_url(url, synchronous="full")
    if url.startswith(("mongodb://", "mongodb+srv://")):
        from worker.store.mongo import MongoStore

        return MongoStore.from_url(url)
    scheme = url.split(":", 1)[0]
    raise ValueError(f"unsupported store URL scheme {scheme!r}; use sqlite:///… or mongodb://…")
