"""The built-in actions run through the engine, and workflow checks at put time."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import pytest

from contracts import Status, Workflow
from contracts.client import JobsClient
from tests.conftest import RawCommands, RunningWorker, WorkerFactory
from tests.engine.helpers import (
    TEST_ACTIONS,
    calls,
    intent_of,
    registry_with_test_actions,
    result_step,
    step_ids,
    submit,
)
from tests.factories import load_envelope
from worker.actions.base import ActionSpec
from worker.actions.registry import ActionRegistry, default_registry
from worker.errors import Unprocessable
from worker.gobl.envelope import verify_digest
from worker.gobl.signing import (
    DEFAULT_KEY_FILE_NAME,
    SigningKey,
    sign_envelope,
    verify_signature,
)
from worker.settings import Settings
from worker.store.sqlite import SqliteStore
from worker.workflows import put_workflow

NUMBER_STEP = {
    "id": "number",
    "action": "sequence.enumerate",
    "config": {"name": "inv", "prefix": "F-", "padding": 3, "start": 7},
}


@pytest.fixture
async def worker(start_worker: WorkerFactory, settings: Settings) -> RunningWorker:
    return await start_worker(settings, registry=registry_with_test_actions())


def invoice_document(**changes: Any) -> dict[str, Any]:
    """Return a bare invoice, which the worker wraps in an envelope with a new head.uuid."""
    document: dict[str, Any] = copy.deepcopy(load_envelope()["doc"])
    document.update(changes)
    return document


async def run_steps(
    worker: RunningWorker, raw: RawCommands, steps: list[dict[str, Any]], data: dict[str, Any]
) -> Any:
    await worker.put_workflow({"id": "actions", "steps": steps})
    _, job = await submit(raw, {"workflow_id": "actions", "data": data})
    return job


async def test_silo_state_sets_entry_state(worker: RunningWorker, raw: RawCommands) -> None:
    steps = [{"id": "state", "action": "silo.state", "config": {"state": "registered"}}]

    job = await run_steps(worker, raw, steps, invoice_document())

    assert job.silo_entry_id is not None
    entry = await worker.store.get_entry("default", job.silo_entry_id)
    assert entry is not None
    assert entry.state == "registered"


async def test_silo_folder_moves_entry(worker: RunningWorker, raw: RawCommands) -> None:
    steps = [{"id": "file", "action": "silo.folder", "config": {"folder": "archive/2024"}}]

    job = await run_steps(worker, raw, steps, invoice_document())

    assert job.silo_entry_id is not None
    entry = await worker.store.get_entry("default", job.silo_entry_id)
    assert entry is not None
    assert entry.folder == "archive/2024"


async def test_silo_close_signs_envelope(worker: RunningWorker, raw: RawCommands) -> None:
    job = await run_steps(worker, raw, [{"id": "sign", "action": "silo.close"}], load_envelope())

    assert job.status is Status.OK
    assert job.envelope is not None
    assert len(job.envelope["sigs"]) == 1
    key = SigningKey.load(worker.settings.data_dir / DEFAULT_KEY_FILE_NAME)
    payload = verify_signature(job.envelope["sigs"][0], key.public_jwk())
    assert payload == {"uuid": job.envelope["head"]["uuid"], "dig": job.envelope["head"]["dig"]}
    entry = await worker.store.get_entry("default", job.silo_entry_id)
    assert entry is not None
    assert entry.envelope["sigs"] == job.envelope["sigs"]


async def test_silo_close_without_code(worker: RunningWorker, raw: RawCommands) -> None:
    document = invoice_document()
    del document["code"]

    job = await run_steps(worker, raw, [{"id": "sign", "action": "silo.close"}], document)

    assert job.status is Status.KO
    assert intent_of(job.intents, "sign").events[-1].code == "not-ready"
    assert [fault.code for fault in job.faults] == ["not-ready"]
    assert job.envelope is not None
    assert "sigs" not in job.envelope


async def test_silo_close_skips_signed(worker: RunningWorker, raw: RawCommands) -> None:
    signed = sign_envelope(load_envelope(), SigningKey.generate())

    job = await run_steps(worker, raw, [{"id": "sign", "action": "silo.close"}], signed)

    assert job.status is Status.SKIP
    assert intent_of(job.intents, "sign").events[-1].code == "already-signed"
    assert job.faults == []
    assert job.envelope is not None
    assert job.envelope["sigs"] == signed["sigs"]


async def test_enumerate_numbers_across_jobs(worker: RunningWorker, raw: RawCommands) -> None:
    await worker.put_workflow({"id": "number", "steps": [NUMBER_STEP]})

    codes = []
    for _ in range(3):
        _, job = await submit(raw, {"workflow_id": "number", "data": invoice_document()})
        assert job.envelope is not None
        codes.append(job.envelope["doc"]["code"])

    assert codes == ["F-007", "F-008", "F-009"]


async def test_enumerate_concurrent_jobs_gap_free(
    worker: RunningWorker, client: JobsClient
) -> None:
    step = {"id": "number", "action": "sequence.enumerate", "config": {"name": "burst"}}
    await worker.put_workflow({"id": "number", "steps": [step]})

    jobs = await asyncio.gather(
        *(
            client.create_job({"workflow_id": "number", "data": invoice_document()}, wait=30)
            for _ in range(30)
        )
    )

    assert all(job.status is Status.OK for job in jobs)
    numbers = sorted(int(job.envelope["doc"]["code"]) for job in jobs if job.envelope)
    assert numbers == list(range(1, 31))


async def test_enumerate_rejects_signed(worker: RunningWorker, raw: RawCommands) -> None:
    signed = sign_envelope(load_envelope(), SigningKey.generate())

    job = await run_steps(worker, raw, [NUMBER_STEP], signed)

    assert job.status is Status.KO
    assert [fault.code for fault in job.faults] == ["envelope-signed"]
    assert job.envelope is not None
    assert job.envelope["doc"]["code"] == signed["doc"]["code"]
    assert job.envelope["sigs"] == signed["sigs"]


async def test_changed_document_recomputes_digest(worker: RunningWorker, raw: RawCommands) -> None:
    original = load_envelope()

    job = await run_steps(worker, raw, [NUMBER_STEP], original)

    assert job.envelope is not None
    assert job.envelope["doc"]["code"] == "F-007"
    assert job.envelope["head"]["dig"] != original["head"]["dig"]
    assert verify_digest(job.envelope)
    entry = await worker.store.get_entry("default", job.silo_entry_id)
    assert entry is not None
    assert verify_digest(entry.envelope)


async def test_rewritten_document_recomputes_digest(
    worker: RunningWorker, raw: RawCommands
) -> None:
    original = load_envelope()
    step = {"id": "rewrite", "action": "test.rewrite", "config": {"field": "code", "value": "R-1"}}

    job = await run_steps(worker, raw, [step], original)

    assert job.status is Status.OK
    assert job.envelope is not None
    assert job.envelope["doc"]["code"] == "R-1"
    assert job.envelope["head"]["uuid"] == original["head"]["uuid"]
    assert job.envelope["head"]["dig"] != original["head"]["dig"]
    assert verify_digest(job.envelope)


async def test_signed_envelope_never_rewritten(worker: RunningWorker, raw: RawCommands) -> None:
    signed = sign_envelope(load_envelope(), SigningKey.generate())
    step = {"id": "rewrite", "action": "test.rewrite", "config": {"field": "code", "value": "R-1"}}

    job = await run_steps(worker, raw, [step], signed)

    assert job.status is Status.KO
    assert len(job.faults) == 1
    entry = await worker.store.get_entry("default", job.silo_entry_id)
    assert entry is not None
    assert entry.envelope == signed


async def test_uninstalled_action_fails_step(worker: RunningWorker, raw: RawCommands) -> None:
    # The workflow was checked against a registry that had the action, but this worker lacks it.
    missing = ActionSpec("test.missing", TEST_ACTIONS[0].run, TEST_ACTIONS[0].config_model)
    workflow = Workflow.model_validate(
        {
            "id": "actions",
            "steps": [{"id": "gone", "action": "test.missing"}, result_step("after")],
            "rescue": [result_step("r")],
        }
    )
    await put_workflow(worker.store, ActionRegistry([*TEST_ACTIONS, missing]), workflow)

    _, job = await submit(raw, {"workflow_id": "actions", "meta": {"origin": "test"}})

    assert step_ids(job.intents) == ["gone", "r"]
    assert [fault.code for fault in job.faults] == ["unknown-action"]
    assert calls(job.id, "after") == 0


async def test_concurrent_jobs_on_one_entry(
    worker: RunningWorker, raw: RawCommands, client: JobsClient
) -> None:
    state = {"id": "state", "action": "silo.state", "config": {"state": "shared"}}
    created = await run_steps(worker, raw, [state], invoice_document())
    append = {"id": "append", "action": "test.append", "config": {"field": "marks"}}
    await worker.put_workflow({"id": "append", "steps": [append]})

    jobs = await asyncio.gather(
        *(
            client.create_job(
                {"workflow_id": "append", "silo_entry_id": created.silo_entry_id}, wait=30
            )
            for _ in range(10)
        )
    )

    assert [job.faults for job in jobs] == [[]] * 10
    entry = await worker.store.get_entry("default", created.silo_entry_id)
    assert entry is not None
    assert sorted(entry.envelope["doc"]["marks"]) == sorted(job.id for job in jobs)
    assert entry.state == "shared"
    assert verify_digest(entry.envelope)


async def test_invoice_workflow_steps(worker: RunningWorker, raw: RawCommands) -> None:
    steps = [
        {"id": "processing", "action": "silo.state", "config": {"state": "processing"}},
        NUMBER_STEP,
        {"id": "sign", "action": "silo.close"},
        {"id": "sent", "action": "silo.state", "config": {"state": "sent"}},
    ]

    job = await run_steps(worker, raw, steps, invoice_document())

    assert step_ids(job.intents) == ["processing", "number", "sign", "sent"]
    assert job.faults == []
    entry = await worker.store.get_entry("default", job.silo_entry_id)
    assert entry is not None
    assert entry.state == "sent"
    assert entry.envelope["doc"]["code"] == "F-007"
    assert len(entry.envelope["sigs"]) == 1


# Workflow checks at put time


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    sqlite = SqliteStore(tmp_path / "workflows.db", synchronous="normal")
    await sqlite.open()
    yield sqlite
    await sqlite.close()


@pytest.mark.parametrize(
    "definition",
    [
        {"id": "bad", "steps": [{"action": "silo.nothing"}]},
        {
            "id": "bad",
            "steps": [{"action": "silo.state", "config": {"state": "x"}}],
            "rescue": [{"action": "pdf.nowhere"}],
        },
        {
            "id": "bad",
            "steps": [
                {
                    "action": "silo.state",
                    "config": {"state": "x"},
                    "next": [{"status": "OK", "steps": [{"action": "silo.nothing"}]}],
                }
            ],
        },
    ],
    ids=["top-level", "rescue", "next-block"],
)
async def test_put_rejects_unknown_action(store: SqliteStore, definition: dict[str, Any]) -> None:
    workflow = Workflow.model_validate(definition)

    with pytest.raises(Unprocessable) as raised:
        await put_workflow(store, default_registry(plugins=False), workflow)

    assert [fault.code for fault in raised.value.faults] == ["unknown-action"]
    assert await store.get_workflow("default", "bad") is None


@pytest.mark.parametrize(
    "config",
    [{}, {"state": ""}, {"state": "sent", "colour": "red"}, {"state": 7}],
    ids=["missing", "empty", "unknown-field", "wrong-type"],
)
async def test_put_rejects_invalid_config(store: SqliteStore, config: dict[str, Any]) -> None:
    workflow = Workflow.model_validate(
        {"id": "bad", "steps": [{"action": "silo.state", "config": config}]}
    )

    with pytest.raises(Unprocessable) as raised:
        await put_workflow(store, default_registry(plugins=False), workflow)

    assert {fault.code for fault in raised.value.faults} == {"invalid-config"}
    assert await store.get_workflow("default", "bad") is None


async def test_put_stores_valid_workflow(store: SqliteStore) -> None:
    workflow = Workflow.model_validate({"id": "good", "steps": [NUMBER_STEP]})

    record = await put_workflow(store, default_registry(plugins=False), workflow)

    stored = await store.get_workflow("default", "good")
    assert stored is not None
    assert stored.version == record.version
