"""Compare-and-set writes to one job, and claiming a job for a runner."""

from __future__ import annotations

import asyncio
import random
import weakref
from collections.abc import Callable
from datetime import timedelta

from contracts.timestamps import utc_now
from worker.errors import FencedOut, StoreUnavailable, TransientError
from worker.models import EntryRecord, JobRecord
from worker.store.base import Store

Mutation = Callable[[JobRecord], None]

#: Compare-and-set attempts before a write gives up. Misses come from other writers of
#: the same job, such as a burst of duplicate commands registering replies. After the
#: first few, each attempt waits a random moment of up to 50 ms, so the writers spread.
MAX_WRITE_ATTEMPTS = 60
_BACKOFF_AFTER = 3
_MAX_BACKOFF_S = 0.05


#: One lock per job with a live handle in this process; it goes when the handles go.
_JOB_LOCKS: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()


def _job_lock(job_id: str) -> asyncio.Lock:
    lock = _JOB_LOCKS.get(job_id)
    if lock is None:
        lock = asyncio.Lock()
        _JOB_LOCKS[job_id] = lock
    return lock


class WriteContention(StoreUnavailable):
    """Other writers of the same job kept winning; the write may succeed later."""


class EntryChanged(TransientError):
    """The silo entry changed under a step; the step runs again on the new version."""


class JobHandle:
    """The latest stored version of a job and the way to change it.

    A write applies a mutation to the latest version in place and stores it with
    compare-and-set on ``rev``. When another writer got there first, the record is
    read again and the mutation applied to the fresh version, so mutations must be
    deltas ("append this intent", "mark this reply sent") rather than whole-record
    snapshots. A handle made with a ``fence`` belongs to the runner of that claim and
    raises ``FencedOut`` as soon as a newer claim exists. Writes through one handle
    are serialised, and so are writes through every handle of the same job in this
    process: a burst of duplicate commands then queues behind the runner instead of
    starving it of compare-and-set wins. Mutating in place, rather than a copy, keeps a
    write cheap: a failed write marks the record stale, and the next write reads it
    again first.
    """

    def __init__(self, store: Store, record: JobRecord, *, fence: int | None = None) -> None:
        self.store = store
        self.record = record
        self.fence = fence
        self._lock = _job_lock(record.id)
        self._stale = False
        self._deferred: list[Mutation] = []

    @property
    def job_id(self) -> str:
        return self.record.id

    def defer(self, mutate: Mutation) -> None:
        """Apply ``mutate`` with the next write instead of writing now.

        Only for changes that may wait and may be applied twice, such as marking an
        outbox item sent: if no write follows, they are lost.
        """
        self._deferred.append(mutate)

    async def write(
        self,
        mutate: Mutation,
        *,
        entry: EntryRecord | None = None,
        expected_entry_rev: int | None = None,
    ) -> JobRecord:
        """Apply ``mutate`` and store the result; return the stored record."""
        async with self._lock:
            if self._stale:
                await self._reload_stale()
            record = self.record
            deferred = list(self._deferred)
            for attempt in range(MAX_WRITE_ATTEMPTS):
                if attempt >= _BACKOFF_AFTER:
                    ceiling = min(_MAX_BACKOFF_S, 0.001 * 2 ** (attempt - _BACKOFF_AFTER))
                    await asyncio.sleep(random.uniform(0, ceiling))
                expected = record.rev
                self._stale = True
                for earlier in deferred:
                    earlier(record)
                mutate(record)
                record.rev = expected + 1
                stored = await self.store.replace_job(
                    record,
                    expected_rev=expected,
                    entry=entry,
                    expected_entry_rev=expected_entry_rev,
                )
                if stored:
                    self._stale = False
                    del self._deferred[: len(deferred)]
                    return record
                record.rev = expected
                record = await self._reload(record, entry_given=entry is not None)
                self.record = record
            raise WriteContention(
                f"job {record.id}: {MAX_WRITE_ATTEMPTS} writes in a row lost to other writers"
            )

    async def _reload_stale(self) -> None:
        fresh = await self.store.get_job(self.record.id)
        if fresh is None:
            raise StoreUnavailable(f"job {self.record.id} disappeared from the store")
        self._check_fence(fresh)
        self.record = fresh
        self._stale = False

    async def refresh(self) -> JobRecord:
        """Read the latest stored version."""
        async with self._lock:
            fresh = await self.store.get_job(self.record.id)
            if fresh is None:
                raise StoreUnavailable(f"job {self.record.id} disappeared from the store")
            self._check_fence(fresh)
            self.record = fresh
            return fresh

    async def _reload(self, base: JobRecord, *, entry_given: bool) -> JobRecord:
        fresh = await self.store.get_job(base.id)
        if fresh is None:
            raise StoreUnavailable(f"job {base.id} disappeared from the store")
        self._check_fence(fresh)
        if entry_given and fresh.rev == base.rev:
            # The job did not move, so the entry's compare-and-set is what missed.
            self.record = fresh
            self._stale = False
            raise EntryChanged(f"silo entry {base.silo_entry_id} changed during the step")
        return fresh

    def _check_fence(self, fresh: JobRecord) -> None:
        if self.fence is not None and fresh.fence != self.fence:
            raise FencedOut(fresh.id, self.fence)


async def claim(store: Store, record: JobRecord, *, owner: str, lease_s: float) -> JobHandle | None:
    """Take ownership of a due, unfinished job; return its runner's handle, or None.

    The claim is a compare-and-set that bumps the fence, so of several workers racing
    for one job exactly one wins, and any earlier runner is fenced out.
    """
    now = utc_now()
    if record.completed_at is not None or (record.due_at is not None and record.due_at > now):
        return None
    candidate = record.model_copy(
        update={
            "fence": record.fence + 1,
            "owner": owner,
            "due_at": now + timedelta(seconds=lease_s),
            "rev": record.rev + 1,
        }
    )
    if not await store.replace_job(candidate, expected_rev=record.rev):
        return None
    return JobHandle(store, candidate, fence=candidate.fence)
