"""The store contract: every backend must pass these unchanged."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from contracts import Status
from contracts.timestamps import utc_now
from tests.factories import entry_record, job_record, reply_item, workflow_record
from tests.store.conftest import StoreFactory
from worker.store.base import InsertStatus, Store, StoredFile

TWO_YEARS = timedelta(days=730)


class TestJobs:
    async def test_insert_and_get_round_trip(self, store: Store) -> None:
        job = job_record(key="invoice-1", meta={"a": "b"}, tags=["x"])
        job.outbox.append(reply_item(deadline=utc_now() + timedelta(seconds=5)))

        result = await store.insert_job(job, key_taken_since=utc_now() - TWO_YEARS)
        loaded = await store.get_job(job.id)

        assert result.status is InsertStatus.CREATED
        assert loaded == job
        assert loaded is not None
        assert loaded.created_at.tzinfo is not None
        assert loaded.outbox[0].deadline == job.outbox[0].deadline

    async def test_get_missing_job_is_none(self, store: Store) -> None:
        assert await store.get_job(job_record().id) is None

    async def test_same_id_is_taken_in_any_workspace(self, store: Store) -> None:
        first = job_record(workspace_id="alpha")
        second = first.model_copy(update={"workspace_id": "beta"})
        await store.insert_job(first, key_taken_since=utc_now() - TWO_YEARS)

        result = await store.insert_job(second, key_taken_since=utc_now() - TWO_YEARS)

        assert result.status is InsertStatus.ID_TAKEN
        assert result.existing is not None
        assert result.existing.workspace_id == "alpha"

    async def test_key_is_unique_per_workspace(self, store: Store) -> None:
        first = job_record(key="k")
        await store.insert_job(first, key_taken_since=utc_now() - TWO_YEARS)

        same_workspace = await store.insert_job(
            job_record(key="k"), key_taken_since=utc_now() - TWO_YEARS
        )
        other_workspace = await store.insert_job(
            job_record(key="k", workspace_id="other"), key_taken_since=utc_now() - TWO_YEARS
        )

        assert same_workspace.status is InsertStatus.KEY_TAKEN
        assert same_workspace.existing is not None
        assert same_workspace.existing.id == first.id
        assert other_workspace.status is InsertStatus.CREATED

    async def test_key_is_free_again_after_it_expires(self, store: Store) -> None:
        old = job_record(key="k", created_at=utc_now() - TWO_YEARS - timedelta(days=1))
        await store.insert_job(old, key_taken_since=utc_now() - TWO_YEARS * 2)
        new = job_record(key="k")

        result = await store.insert_job(new, key_taken_since=utc_now() - TWO_YEARS)
        holder = await store.get_job_by_key("default", "k")

        assert result.status is InsertStatus.CREATED
        assert holder is not None
        assert holder.id == new.id
        assert await store.get_job(old.id) is not None

    async def test_key_lookup_is_scoped_to_workspace(self, store: Store) -> None:
        await store.insert_job(job_record(key="k"), key_taken_since=utc_now() - TWO_YEARS)

        assert await store.get_job_by_key("other", "k") is None
        assert await store.get_job_by_key("default", "missing") is None

    async def test_concurrent_inserts_of_one_key_create_one_job(
        self, store_factory: StoreFactory
    ) -> None:
        stores = [store_factory() for _ in range(3)]
        for each in stores:
            await each.open()
        jobs = [job_record(key="race") for _ in range(12)]

        results = await asyncio.gather(
            *(
                stores[i % 3].insert_job(job, key_taken_since=utc_now() - TWO_YEARS)
                for i, job in enumerate(jobs)
            )
        )

        created = [r for r in results if r.status is InsertStatus.CREATED]
        taken = [r for r in results if r.status is InsertStatus.KEY_TAKEN]
        assert len(created) == 1
        assert len(taken) == 11

    async def test_insert_with_entry_stores_both(self, store: Store) -> None:
        entry = entry_record()
        job = job_record(silo_entry_id=entry.id)

        result = await store.insert_job(job, key_taken_since=utc_now() - TWO_YEARS, entry=entry)

        assert result.status is InsertStatus.CREATED
        assert await store.get_entry("default", entry.id) == entry

    async def test_insert_with_taken_entry_writes_no_job(self, store: Store) -> None:
        entry = entry_record()
        await store.insert_entry(entry)
        job = job_record(silo_entry_id=entry.id)

        result = await store.insert_job(job, key_taken_since=utc_now() - TWO_YEARS, entry=entry)

        assert result.status is InsertStatus.ENTRY_TAKEN
        assert result.entry is not None
        assert result.entry.id == entry.id
        assert await store.get_job(job.id) is None

    async def test_taken_id_leaves_no_entry(self, store: Store) -> None:
        job = job_record()
        await store.insert_job(job, key_taken_since=utc_now() - TWO_YEARS)
        entry = entry_record()

        result = await store.insert_job(
            job.model_copy(update={"silo_entry_id": entry.id}),
            key_taken_since=utc_now() - TWO_YEARS,
            entry=entry,
        )

        assert result.status is InsertStatus.ID_TAKEN
        assert await store.get_entry("default", entry.id) is None

    async def test_taken_key_leaves_no_entry(self, store: Store) -> None:
        holder = job_record(key="k")
        await store.insert_job(holder, key_taken_since=utc_now() - TWO_YEARS)
        entry = entry_record()

        result = await store.insert_job(
            job_record(key="k", silo_entry_id=entry.id),
            key_taken_since=utc_now() - TWO_YEARS,
            entry=entry,
        )

        assert result.status is InsertStatus.KEY_TAKEN
        assert result.existing is not None
        assert result.existing.id == holder.id
        assert await store.get_entry("default", entry.id) is None

    async def test_expired_key_holder_can_still_be_replaced(self, store: Store) -> None:
        old = job_record(key="k", created_at=utc_now() - TWO_YEARS - timedelta(days=1))
        await store.insert_job(old, key_taken_since=utc_now() - TWO_YEARS * 2)
        new = job_record(key="k")
        await store.insert_job(new, key_taken_since=utc_now() - TWO_YEARS)

        written = await store.replace_job(
            old.model_copy(update={"rev": 1, "status": Status.OK}), expected_rev=0
        )
        holder = await store.get_job_by_key("default", "k")

        assert written is True
        assert holder is not None
        assert holder.id == new.id

    async def test_replace_is_compare_and_set_on_rev(self, store: Store) -> None:
        job = job_record()
        await store.insert_job(job, key_taken_since=utc_now() - TWO_YEARS)
        first = job.model_copy(update={"rev": 1, "status": Status.RUN})
        stale = job.model_copy(update={"rev": 1, "status": Status.KO})

        assert await store.replace_job(first, expected_rev=0) is True
        assert await store.replace_job(stale, expected_rev=0) is False
        loaded = await store.get_job(job.id)
        assert loaded is not None
        assert loaded.status == "RUN"
        assert loaded.rev == 1

    async def test_replace_with_entry_writes_both(self, store: Store) -> None:
        entry = entry_record()
        job = job_record(silo_entry_id=entry.id)
        await store.insert_job(job, key_taken_since=utc_now() - TWO_YEARS, entry=entry)
        new_entry = entry.model_copy(update={"rev": 1, "state": "sent"})
        new_job = job.model_copy(update={"rev": 1, "status": Status.OK})

        written = await store.replace_job(
            new_job, expected_rev=0, entry=new_entry, expected_entry_rev=0
        )

        assert written is True
        stored_entry = await store.get_entry("default", entry.id)
        assert stored_entry is not None
        assert stored_entry.state == "sent"

    async def test_replace_with_stale_entry_writes_no_job(self, store: Store) -> None:
        entry = entry_record()
        job = job_record(silo_entry_id=entry.id)
        await store.insert_job(job, key_taken_since=utc_now() - TWO_YEARS, entry=entry)
        stale_entry = entry.model_copy(update={"rev": 1, "state": "sent"})

        written = await store.replace_job(
            job.model_copy(update={"rev": 1, "status": Status.OK}),
            expected_rev=0,
            entry=stale_entry,
            expected_entry_rev=7,
        )

        assert written is False
        loaded = await store.get_job(job.id)
        assert loaded is not None
        assert loaded.rev == 0

    async def test_replace_with_stale_job_keeps_old_entry(self, store: Store) -> None:
        entry = entry_record()
        job = job_record(silo_entry_id=entry.id)
        await store.insert_job(job, key_taken_since=utc_now() - TWO_YEARS, entry=entry)

        written = await store.replace_job(
            job.model_copy(update={"rev": 8, "status": Status.OK}),
            expected_rev=7,
            entry=entry.model_copy(update={"rev": 1, "state": "sent"}),
            expected_entry_rev=0,
        )

        assert written is False
        assert await store.get_entry("default", entry.id) == entry

    async def test_due_jobs_are_unfinished_and_past_due(self, store: Store) -> None:
        now = utc_now()
        overdue = job_record(due_at=now - timedelta(seconds=10))
        due = job_record(due_at=now - timedelta(seconds=1))
        future = job_record(due_at=now + timedelta(seconds=60))
        finished = job_record(due_at=None, completed_at=now)
        for job in (due, future, finished, overdue):
            await store.insert_job(job, key_taken_since=now - TWO_YEARS)

        found = await store.due_jobs(now, limit=10)
        limited = await store.due_jobs(now, limit=1)

        assert [job.id for job in found] == [overdue.id, due.id]
        assert [job.id for job in limited] == [overdue.id]

    async def test_due_outboxes(self, store: Store) -> None:
        now = utc_now()
        owing = job_record(outbox_due_at=now - timedelta(seconds=1))
        later = job_record(outbox_due_at=now + timedelta(seconds=60))
        clean = job_record()
        for job in (owing, later, clean):
            await store.insert_job(job, key_taken_since=now - TWO_YEARS)

        found = await store.due_outboxes(now, limit=10)

        assert [job.id for job in found] == [owing.id]


class TestEntries:
    async def test_insert_get_and_duplicate(self, store: Store) -> None:
        entry = entry_record(key="doc-1")

        assert await store.insert_entry(entry) is None
        assert await store.get_entry("default", entry.id) == entry
        duplicate = await store.insert_entry(entry)
        assert duplicate is not None
        assert duplicate.id == entry.id

    async def test_same_id_in_two_workspaces(self, store: Store) -> None:
        entry = entry_record()
        other = entry.model_copy(update={"workspace_id": "other"})

        assert await store.insert_entry(entry) is None
        assert await store.insert_entry(other) is None
        assert await store.get_entry("other", entry.id) == other

    async def test_entry_key_is_unique_per_workspace(self, store: Store) -> None:
        first = entry_record(key="k")
        await store.insert_entry(first)

        clash = await store.insert_entry(entry_record(key="k"))
        elsewhere = await store.insert_entry(entry_record(key="k", workspace_id="other"))

        assert clash is not None
        assert clash.id == first.id
        assert elsewhere is None

    async def test_replace_is_compare_and_set(self, store: Store) -> None:
        entry = entry_record()
        await store.insert_entry(entry)

        first = await store.replace_entry(
            entry.model_copy(update={"rev": 1, "folder": "a"}), expected_rev=0
        )
        second = await store.replace_entry(
            entry.model_copy(update={"rev": 1, "folder": "b"}), expected_rev=0
        )

        assert first is True
        assert second is False
        loaded = await store.get_entry("default", entry.id)
        assert loaded is not None
        assert loaded.folder == "a"


class TestWorkflows:
    async def test_latest_put_is_current(self, store: Store) -> None:
        await store.put_workflow(workflow_record(version="v1"))
        await store.put_workflow(workflow_record(version="v2"))

        current = await store.get_workflow("default", "invoice")
        pinned = await store.get_workflow("default", "invoice", "v1")

        assert current is not None
        assert current.version == "v2"
        assert pinned is not None
        assert pinned.version == "v1"

    async def test_putting_an_old_version_makes_it_current(self, store: Store) -> None:
        await store.put_workflow(workflow_record(version="v1"))
        await store.put_workflow(workflow_record(version="v2"))
        await store.put_workflow(workflow_record(version="v1"))

        current = await store.get_workflow("default", "invoice")

        assert current is not None
        assert current.version == "v1"

    async def test_list_returns_current_versions_of_workspace(self, store: Store) -> None:
        await store.put_workflow(workflow_record("b", version="v1"))
        await store.put_workflow(workflow_record("a", version="v1"))
        await store.put_workflow(workflow_record("a", version="v2"))
        await store.put_workflow(workflow_record("c", workspace_id="other"))

        listed = await store.list_workflows("default")

        assert [(w.id, w.version) for w in listed] == [("a", "v2"), ("b", "v1")]

    async def test_missing_workflow_is_none(self, store: Store) -> None:
        await store.put_workflow(workflow_record(workspace_id="other"))

        assert await store.get_workflow("default", "invoice") is None
        assert await store.get_workflow("other", "invoice", "nope") is None


class TestSequences:
    async def test_numbers_follow_from_start(self, store: Store) -> None:
        numbers = [
            await store.assign_number("default", "inv", f"entry-{i}", start=100) for i in range(3)
        ]

        assert numbers == [100, 101, 102]

    async def test_same_entry_keeps_its_number(self, store: Store) -> None:
        first = await store.assign_number("default", "inv", "entry-a", start=1)
        await store.assign_number("default", "inv", "entry-b", start=1)

        again = await store.assign_number("default", "inv", "entry-a", start=1)

        assert first == 1
        assert again == 1

    async def test_series_are_per_workspace_and_name(self, store: Store) -> None:
        a = await store.assign_number("default", "inv", "e1", start=1)
        b = await store.assign_number("default", "credit", "e1", start=1)
        c = await store.assign_number("other", "inv", "e1", start=1)

        assert (a, b, c) == (1, 1, 1)

    async def test_concurrent_assignment_has_no_gap_or_repeat(
        self, store_factory: StoreFactory
    ) -> None:
        stores = [store_factory() for _ in range(4)]
        for each in stores:
            await each.open()

        numbers = await asyncio.gather(
            *(
                stores[i % 4].assign_number("default", "inv", f"entry-{i}", start=1)
                for i in range(60)
            )
        )

        assert sorted(numbers) == list(range(1, 61))


class TestFiles:
    async def test_put_and_get(self, store: Store) -> None:
        data = bytes(range(256)) * 10
        await store.put_file(StoredFile("default", "f1", "invoice.pdf", "application/pdf", data))

        loaded = await store.get_file("default", "f1")

        assert loaded is not None
        assert loaded.data == data
        assert loaded.mime == "application/pdf"
        assert await store.get_file("other", "f1") is None

    async def test_large_file_round_trip(self, store: Store) -> None:
        data = bytes(range(256)) * 3000
        await store.put_file(StoredFile("default", "big", "big.bin", "application/pdf", data))

        loaded = await store.get_file("default", "big")

        assert loaded is not None
        assert loaded.data == data

    async def test_existing_file_is_kept(self, store: Store) -> None:
        await store.put_file(StoredFile("default", "f1", "a.pdf", "application/pdf", b"first"))
        await store.put_file(StoredFile("default", "f1", "b.txt", "text/plain", b"second"))

        loaded = await store.get_file("default", "f1")

        assert loaded is not None
        assert loaded.data == b"first"
        assert loaded.name == "a.pdf"
        assert loaded.mime == "application/pdf"


async def test_ping(store: Store) -> None:
    await store.ping()
