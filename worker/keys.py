"""The signing key, loaded or created on first use."""

from __future__ import annotations

import asyncio

import structlog

from worker.gobl.signing import SigningKey, load_or_create_key
from worker.settings import Settings

log = structlog.get_logger("worker.keys")


class SigningKeyProvider:
    """Loads the configured JWK, or creates one in the data folder, once."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._key: SigningKey | None = None
        self._lock = asyncio.Lock()

    async def __call__(self) -> SigningKey:
        if self._key is not None:
            return self._key
        async with self._lock:
            if self._key is None:
                key, created = await asyncio.to_thread(
                    load_or_create_key, self.settings.signing_key_file, self.settings.data_dir
                )
                configured = self.settings.signing_key_file is not None
                if created:
                    log.info("signing_key.created", kid=key.kid, configured=configured)
                else:
                    log.info("signing_key.loaded", kid=key.kid, configured=configured)
                self._key = key
            return self._key
