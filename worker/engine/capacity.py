"""Job slots shared by the consumer and the sweeper."""

from __future__ import annotations

import asyncio

from worker.errors import TransientError


class ShuttingDown(TransientError):
    """The worker is stopping and takes no new work; the command goes back to the queue."""


class Capacity:
    """A counter of job slots shared by the consumer and the sweeper."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._used = 0
        self._closed = False
        self._changed = asyncio.Condition()

    @property
    def free(self) -> int:
        return self.size - self._used

    async def acquire(self) -> None:
        """Wait for a free slot; raise ShuttingDown once the capacity is closed."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._closed or self._used < self.size)
            if self._closed:
                raise ShuttingDown("the worker is stopping")
            self._used += 1

    def try_acquire(self) -> bool:
        if self._closed or self._used >= self.size:
            return False
        self._used += 1
        return True

    async def release(self) -> None:
        async with self._changed:
            self._used -= 1
            self._changed.notify()

    async def close(self) -> None:
        """Refuse every later and waiting acquire."""
        async with self._changed:
            self._closed = True
            self._changed.notify_all()
