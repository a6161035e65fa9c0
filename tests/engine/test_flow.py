"""How a workflow's steps, next blocks and rescue steps decide what runs."""

from __future__ import annotations

from typing import Any

import pytest

from contracts import Fault, Job, Status
from tests.conftest import Captured, RawCommands, RunningWorker, WorkerFactory, reply_status
from tests.engine.helpers import (
    calls,
    event_statuses,
    intent_of,
    registry_with_test_actions,
    result_step,
    step_ids,
    submit,
)
from tests.factories import load_envelope
from worker.settings import Settings


@pytest.fixture
async def worker(start_worker: WorkerFactory, settings: Settings) -> RunningWorker:
    return await start_worker(settings, registry=registry_with_test_actions())


async def run_flow(
    worker: RunningWorker,
    raw: RawCommands,
    steps: list[dict[str, Any]],
    *,
    rescue: list[dict[str, Any]] | None = None,
    **command: Any,
) -> Job:
    """Store a workflow of ``steps``, run one job on it and return the completed job."""
    await worker.put_workflow({"id": "flow", "steps": steps, "rescue": rescue or []})
    command.setdefault("meta", {"origin": "test"})
    _, job = await submit(raw, {"workflow_id": "flow", **command})
    return job


async def test_steps_run_in_order(worker: RunningWorker, raw: RawCommands) -> None:
    job = await run_flow(worker, raw, [result_step("a"), result_step("b"), result_step("c")])

    assert job.completed_at is not None
    assert step_ids(job.intents) == ["a", "b", "c"]
    for intent in job.intents:
        assert event_statuses(intent) == [Status.RUN, Status.OK], intent.step_id
        assert [event.index for event in intent.events] == [0, 1], intent.step_id
        assert intent.completed, intent.step_id
    assert job.status is Status.OK
    assert job.faults == []


async def test_completed_job_events(
    worker: RunningWorker, raw: RawCommands, events: Captured
) -> None:
    job = await run_flow(worker, raw, [result_step("a")])

    await events.wait_for(lambda m: m.type == "job.completed")
    assert [m.type for m in events.messages] == ["job.accepted", "job.completed"]
    assert events.messages[-1].headers["x-job-id"] == job.id


async def test_next_block_runs_then_flow_continues(worker: RunningWorker, raw: RawCommands) -> None:
    first = result_step("a", "KO", code="late")
    first["next"] = [{"status": "KO", "code": "late", "steps": [result_step("b")]}]

    job = await run_flow(worker, raw, [first, result_step("c")], rescue=[result_step("r")])

    assert step_ids(job.intents) == ["a", "b", "c"]
    assert job.faults == []
    assert job.status is Status.OK


async def test_next_code_mismatch_is_unhandled(worker: RunningWorker, raw: RawCommands) -> None:
    first = result_step("a", "KO", code="late")
    first["next"] = [{"status": "KO", "code": "other", "steps": [result_step("b")]}]

    job = await run_flow(worker, raw, [first, result_step("c")], rescue=[result_step("r")])

    assert step_ids(job.intents) == ["a", "r"]
    assert [fault.code for fault in job.faults] == ["late"]


async def test_next_stop_ends_workflow(worker: RunningWorker, raw: RawCommands) -> None:
    first = result_step("a")
    first["next"] = [{"status": "OK", "steps": [result_step("b")], "stop": True}]

    job = await run_flow(worker, raw, [first, result_step("c")])

    assert step_ids(job.intents) == ["a", "b"]
    assert job.completed_at is not None
    assert job.faults == []
    assert calls(job.id, "c") == 0


@pytest.mark.parametrize(
    "block",
    [
        {"status": "", "steps": [result_step("b")]},
        {"steps": [result_step("b")]},
        {"code": "nothing-to-do", "steps": [result_step("b")]},
    ],
    ids=["empty-status", "absent-status", "code-only"],
)
async def test_next_without_status_matches_any(
    worker: RunningWorker, raw: RawCommands, block: dict[str, Any]
) -> None:
    first = result_step("a", "SKIP", code="nothing-to-do")
    first["next"] = [block]

    job = await run_flow(worker, raw, [first, result_step("c")])

    assert step_ids(job.intents) == ["a", "b", "c"]


async def test_next_status_mismatch_skips_block(worker: RunningWorker, raw: RawCommands) -> None:
    first = result_step("a")
    first["next"] = [{"status": "KO", "steps": [result_step("b")]}]

    job = await run_flow(worker, raw, [first, result_step("c")])

    assert step_ids(job.intents) == ["a", "c"]


async def test_first_matching_block_wins(worker: RunningWorker, raw: RawCommands) -> None:
    first = result_step("a", "KO", code="late")
    first["next"] = [
        {"status": "OK", "steps": [result_step("b0")]},
        {"status": "KO", "steps": [result_step("b1")]},
        {"steps": [result_step("b2")]},
    ]

    job = await run_flow(worker, raw, [first, result_step("c")])

    assert step_ids(job.intents) == ["a", "b1", "c"]


async def test_unhandled_ko_records_fault(worker: RunningWorker, raw: RawCommands) -> None:
    steps = [
        result_step("a"),
        result_step("b", "KO", code="bad", message="went wrong"),
        result_step("c"),
    ]

    job = await run_flow(worker, raw, steps, rescue=[result_step("r")])

    assert job.faults == [Fault(action="test.result", code="bad", message="went wrong")]
    assert step_ids(job.intents) == ["a", "b", "r"]
    assert event_statuses(intent_of(job.intents, "b")) == [Status.RUN, Status.KO]
    assert job.completed_at is not None
    assert calls(job.id, "c") == 0


async def test_unhandled_ko_replies_completed(
    worker: RunningWorker, raw: RawCommands, events: Captured
) -> None:
    await worker.put_workflow(
        {"id": "flow", "steps": [result_step("a", "KO", code="bad")], "rescue": [result_step("r")]}
    )

    reply, job = await submit(raw, {"workflow_id": "flow", "meta": {"origin": "test"}})

    assert reply.type == "job.completed"
    assert reply_status(reply) == 200
    assert job.completed_at is not None
    await events.wait_for(lambda m: m.type == "job.failed")
    assert [m.type for m in events.messages] == ["job.accepted", "job.failed"]


async def test_handled_ko_has_no_fault(worker: RunningWorker, raw: RawCommands) -> None:
    first = result_step("a", "KO", code="bad")
    first["next"] = [{"status": "KO", "steps": [result_step("b")]}]

    job = await run_flow(worker, raw, [first], rescue=[result_step("r")])

    assert job.faults == []
    assert step_ids(job.intents) == ["a", "b"]
    assert calls(job.id, "r") == 0


async def test_ko_inside_block_runs_rescue(worker: RunningWorker, raw: RawCommands) -> None:
    first = result_step("a")
    first["next"] = [{"status": "OK", "steps": [result_step("b", "KO", code="inner")]}]

    job = await run_flow(worker, raw, [first, result_step("c")], rescue=[result_step("r")])

    assert step_ids(job.intents) == ["a", "b", "r"]
    assert [fault.code for fault in job.faults] == ["inner"]


async def test_timeout_records_fault(worker: RunningWorker, raw: RawCommands) -> None:
    slow = result_step("slow", sleep_s=30)
    slow["timeout"] = 0.2

    job = await run_flow(worker, raw, [slow, result_step("c")], rescue=[result_step("r")])

    assert event_statuses(intent_of(job.intents, "slow")) == [Status.RUN, Status.TIMEOUT]
    assert step_ids(job.intents) == ["slow", "r"]
    assert len(job.faults) == 1
    assert job.faults[0].action == "test.result"
    assert job.faults[0].message


async def test_timeout_matched_by_block(worker: RunningWorker, raw: RawCommands) -> None:
    slow = result_step("slow", sleep_s=30)
    slow["timeout"] = 0.2
    slow["next"] = [{"status": "TIMEOUT", "steps": [result_step("late")]}]

    job = await run_flow(worker, raw, [slow, result_step("c")], rescue=[result_step("r")])

    assert step_ids(job.intents) == ["slow", "late", "c"]
    assert job.faults == []


async def test_schema_mismatch_fails_first_step(worker: RunningWorker, raw: RawCommands) -> None:
    first = result_step("a")
    first["next"] = [{"status": "KO", "steps": [result_step("b")]}]
    await worker.put_workflow(
        {
            "id": "invoices",
            "schema": "bill/invoice",
            "steps": [first, result_step("c")],
            "rescue": [result_step("r")],
        }
    )

    _, job = await submit(raw, {"workflow_id": "invoices", "data": load_envelope("es-party.json")})

    assert step_ids(job.intents) == ["a", "r"]
    assert intent_of(job.intents, "a").events[-1].status is Status.KO
    assert intent_of(job.intents, "a").events[-1].code == "schema-mismatch"
    assert [fault.code for fault in job.faults] == ["schema-mismatch"]
    assert calls(job.id, "a") == 0


async def test_schema_match_runs_steps(worker: RunningWorker, raw: RawCommands) -> None:
    await worker.put_workflow(
        {"id": "invoices", "schema": "bill/invoice", "steps": [result_step("a")]}
    )

    _, job = await submit(raw, {"workflow_id": "invoices", "data": load_envelope()})

    assert job.faults == []
    assert calls(job.id, "a") == 1


@pytest.mark.parametrize(
    ("steps", "rescue", "status"),
    [
        ([result_step("a", "KO", code="bad")], [], Status.KO),
        ([result_step("a", sleep_s=30)], [], Status.TIMEOUT),
        ([result_step("a", "KO", code="bad")], [result_step("r")], Status.OK),
        ([result_step("a"), result_step("b", "SKIP", code="none")], [], Status.SKIP),
    ],
    ids=["ko", "timeout", "rescued", "skip"],
)
async def test_job_status_is_last_event(
    worker: RunningWorker,
    raw: RawCommands,
    steps: list[dict[str, Any]],
    rescue: list[dict[str, Any]],
    status: Status,
) -> None:
    steps = [dict(step) for step in steps]
    if status is Status.TIMEOUT:
        steps[0]["timeout"] = 0.2

    job = await run_flow(worker, raw, steps, rescue=rescue)

    assert job.status is status
    assert job.status is job.intents[-1].events[-1].status


async def test_rescued_job_keeps_faults(worker: RunningWorker, raw: RawCommands) -> None:
    job = await run_flow(
        worker, raw, [result_step("a", "KO", code="bad")], rescue=[result_step("r")]
    )

    assert job.status is Status.OK
    assert job.faults != []


async def test_action_meta_merged(worker: RunningWorker, raw: RawCommands) -> None:
    steps = [result_step("a", meta={"number": "7"}), result_step("b", meta={"origin": "b"})]

    job = await run_flow(worker, raw, steps, meta={"origin": "test", "kept": "yes"})

    assert job.meta == {"origin": "b", "kept": "yes", "number": "7"}


async def test_rescue_steps_all_run(worker: RunningWorker, raw: RawCommands) -> None:
    rescue = [result_step("r1", "KO", code="rescue-failed"), result_step("r2")]

    job = await run_flow(worker, raw, [result_step("a", "KO", code="bad")], rescue=rescue)

    assert step_ids(job.intents) == ["a", "r1", "r2"]
    assert intent_of(job.intents, "r2").events[-1].status is Status.OK
    assert [fault.code for fault in job.faults] == ["bad", "rescue-failed"]
    assert job.completed_at is not None
