"""What the engine lends to actions: number series, the signing key, an HTTP client."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import httpx

from worker.actions.base import Services
from worker.gobl.signing import SigningKey
from worker.store.base import Store


class EntryNumbers:
    """Series numbers tied to one silo entry, so that asking twice gives one number."""

    def __init__(self, store: Store, workspace_id: str, entry_id: str | None) -> None:
        self.store = store
        self.workspace_id = workspace_id
        self.entry_id = entry_id

    async def assign(self, series: str, *, start: int) -> int:
        if self.entry_id is None:
            raise ValueError("a number needs a silo entry to belong to")
        return await self.store.assign_number(self.workspace_id, series, self.entry_id, start=start)


class ServicesFactory:
    """Builds the ``Services`` an action gets for one job."""

    def __init__(
        self,
        store: Store,
        *,
        signing_key: Callable[[], Awaitable[SigningKey]],
        webhook_allow_hosts: frozenset[str] = frozenset(),
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.store = store
        self.signing_key = signing_key
        self.webhook_allow_hosts = webhook_allow_hosts
        self.http = http

    def for_entry(self, workspace_id: str, entry_id: str | None) -> Services:
        return Services(
            numbers=EntryNumbers(self.store, workspace_id, entry_id),
            signing_key=self.signing_key,
            webhook_allow_hosts=self.webhook_allow_hosts,
            http=self.http,
        )
