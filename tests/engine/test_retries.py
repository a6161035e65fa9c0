"""Transient failures: retries in place, durable rescheduling, QUEUED polls and crashes."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from contracts import Job, Status, utc_now
from tests.conftest import (
    RawCommands,
    RunningWorker,
    WorkerFactory,
    fast_settings,
    reply_json,
)
from tests.engine.helpers import (
    CALL_TIMES,
    calls,
    event_statuses,
    intent_of,
    poll_job,
    registry_with_test_actions,
    result_step,
    step_ids,
    submit,
)
from tests.factories import new_id
from worker.engine.schedule import retry_delay_s
from worker.settings import Settings


@pytest.fixture
def overrides() -> dict[str, Any]:
    """Return the settings that differ from ``fast_settings``. A test parametrizes this fixture."""
    return {}


@pytest.fixture
def settings(tmp_path: Path, broker: str, overrides: dict[str, Any]) -> Settings:
    return fast_settings(tmp_path, **overrides)


@pytest.fixture
async def worker(start_worker: WorkerFactory, settings: Settings) -> RunningWorker:
    return await start_worker(settings, registry=registry_with_test_actions())


def flaky_workflow(**config: Any) -> dict[str, Any]:
    return {"id": "retry", "steps": [{"id": "a", "action": "test.flaky", "config": config}]}


def command(job_id: str | None = None) -> dict[str, Any]:
    return {"id": job_id or new_id(), "workflow_id": "retry", "meta": {"origin": "test"}}


async def reply_job(raw: RawCommands, correlation_id: str) -> Job:
    return Job.model_validate(reply_json(await raw.reply(correlation_id)))


async def test_transient_once_retried_in_place(worker: RunningWorker, raw: RawCommands) -> None:
    await worker.put_workflow(flaky_workflow(failures=1))

    _, job = await submit(raw, command())

    assert job.status is Status.OK
    assert step_ids(job.intents) == ["a"]
    assert event_statuses(job.intents[0]) == [Status.RUN, Status.ERR, Status.OK]
    assert [event.index for event in job.intents[0].events] == [0, 1, 2]
    assert calls(job.id, "a") == 2
    assert job.faults == []


# A first delay of 1 s leaves time to read the waiting job before it runs again.
SLOW_SCHEDULE = {"retry_first_s": 1.0, "retry_doubling_max_s": 1.0, "retry_steady_s": 1.0}


@pytest.mark.parametrize("overrides", [SLOW_SCHEDULE], ids=["first-delay-1s"])
async def test_failing_step_rescheduled_durably(worker: RunningWorker, raw: RawCommands) -> None:
    await worker.put_workflow(flaky_workflow(failures=2))
    job_id = new_id()
    correlation_id = await raw.publish(command(job_id))

    waiting = await poll_job(worker.store, job_id, lambda job: job.status is Status.ERR)
    read_at = utc_now()
    job = await reply_job(raw, correlation_id)

    assert waiting.completed_at is None
    assert waiting.attempts >= 1
    assert waiting.next_attempt_at is not None
    assert waiting.due_at is not None
    assert waiting.due_at > read_at
    assert waiting.owner is None
    assert job.status is Status.OK
    assert job.completed_at is not None


async def test_rescheduled_step_completes(worker: RunningWorker, raw: RawCommands) -> None:
    await worker.put_workflow(flaky_workflow(failures=4))

    _, job = await submit(raw, command())

    assert job.status is Status.OK
    assert job.faults == []
    assert step_ids(job.intents) == ["a"]
    assert calls(job.id, "a") == 5
    events = job.intents[0].events
    assert [event.index for event in events] == list(range(len(events)))
    assert events[-1].status is Status.OK
    assert job.attempts == 0
    assert job.next_attempt_at is None


@pytest.mark.parametrize("overrides", [{"retry_total_s": 1.0}], ids=["window-1s"])
async def test_retries_exhausted_after_window(worker: RunningWorker, raw: RawCommands) -> None:
    await worker.put_workflow(flaky_workflow(failures=1000))

    _, job = await submit(raw, command())

    assert job.status is Status.KO
    intent = intent_of(job.intents, "a")
    assert intent.events[-1].code == "retries-exhausted"
    assert [fault.code for fault in job.faults] == ["retries-exhausted"]
    assert calls(job.id, "a") > worker.settings.retry_inline_attempts
    assert intent.events[-1].at - intent.created_at <= timedelta(seconds=1.0)


async def test_retry_in_honoured(worker: RunningWorker, raw: RawCommands) -> None:
    await worker.put_workflow(flaky_workflow(failures=1, retry_in_s=0.6))
    job_id = new_id()
    correlation_id = await raw.publish(command(job_id))

    waiting = await poll_job(worker.store, job_id, lambda job: job.status is Status.ERR)
    job = await reply_job(raw, correlation_id)

    error_event = waiting.intents[0].events[-1]
    assert error_event.status is Status.ERR
    assert waiting.next_attempt_at is not None
    delay_s = (waiting.next_attempt_at - error_event.at).total_seconds()
    assert delay_s == pytest.approx(0.6, abs=0.01)
    assert job.status is Status.OK
    first, second = CALL_TIMES[(job_id, "a")]
    assert second - first >= 0.55


async def test_queued_polled_again(worker: RunningWorker, raw: RawCommands) -> None:
    config = {"polls": 1, "retry_in_s": 0.5}
    await worker.put_workflow(
        {"id": "retry", "steps": [{"id": "a", "action": "test.queued", "config": config}]}
    )
    job_id = new_id()
    correlation_id = await raw.publish(command(job_id))

    waiting = await poll_job(worker.store, job_id, lambda job: job.status is Status.QUEUED)
    job = await reply_job(raw, correlation_id)

    assert waiting.completed_at is None
    assert waiting.next_attempt_at is not None
    assert job.status is Status.OK
    assert event_statuses(job.intents[0]) == [Status.RUN, Status.QUEUED, Status.RUN, Status.OK]
    assert calls(job_id, "a") == 2


async def test_crashing_action_is_action_error(worker: RunningWorker, raw: RawCommands) -> None:
    await worker.put_workflow(
        {"id": "retry", "steps": [{"id": "a", "action": "test.crash"}, result_step("b")]}
    )
    await worker.put_workflow({"id": "fine", "steps": [result_step("a")]})

    _, crashed = await submit(raw, command())
    _, fine = await submit(raw, {"workflow_id": "fine", "meta": {"origin": "test"}})

    assert crashed.status is Status.KO
    assert intent_of(crashed.intents, "a").events[-1].code == "action-error"
    assert [fault.code for fault in crashed.faults] == ["action-error"]
    assert calls(crashed.id, "a") == 1
    assert calls(crashed.id, "b") == 0
    assert fine.status is Status.OK
    assert fine.completed_at is not None


def test_retry_schedule_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("TRANSFORM_")]:
        monkeypatch.delenv(name)
    settings = Settings()

    delays = [retry_delay_s(attempt, settings) for attempt in range(1, 13)]

    assert delays[:9] == [5, 10, 20, 40, 80, 160, 320, 640, 1280]
    assert delays[9:] == [1800, 1800, 1800]
    assert settings.retry_total_s == 12 * 3600


@pytest.mark.parametrize("overrides", [{"retry_first_s": 0.4}])
async def test_retry_in_floored_at_first_delay(worker: RunningWorker, raw: RawCommands) -> None:
    # An action asking to run again at once waits the schedule's first delay all the same.
    await worker.put_workflow(flaky_workflow(failures=1, retry_in_s=0.0))
    job_id = new_id()
    correlation_id = await raw.publish(command(job_id))

    waiting = await poll_job(worker.store, job_id, lambda job: job.status is Status.ERR)
    job = await reply_job(raw, correlation_id)

    assert waiting.next_attempt_at is not None
    error_event = waiting.intents[0].events[-1]
    delay_s = (waiting.next_attempt_at - error_event.at).total_seconds()
    assert delay_s == pytest.approx(0.4, abs=0.01)
    assert job.status is Status.OK


@pytest.mark.parametrize("overrides", [{"retry_max_attempts": 2, "retry_total_s": 3600.0}])
async def test_retry_attempts_capped(worker: RunningWorker, raw: RawCommands) -> None:
    await worker.put_workflow(flaky_workflow(failures=1000, retry_in_s=0.05))

    _, job = await submit(raw, command())

    intent = intent_of(job.intents, "a")
    assert job.status is Status.KO
    assert intent.events[-1].code == "retries-exhausted"
    assert "failed 2 times" in (intent.events[-1].message or "")
    assert calls(job.id, "a") == 3
