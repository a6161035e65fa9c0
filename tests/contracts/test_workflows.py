"""Workflow definitions: step ids, aliases and the matching of ``next`` blocks."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from contracts import Next, Workflow


def workflow(steps: list[dict[str, Any]], **fields: Any) -> Workflow:
    return Workflow.model_validate({"id": "invoice", "steps": steps, **fields})


def state_step(**fields: Any) -> dict[str, Any]:
    return {"action": "silo.state", "config": {"state": "sent"}, **fields}


def test_step_ids_filled_from_position() -> None:
    flow = workflow([state_step(), state_step()])

    assert [step.id for step in flow.steps] == ["steps.0", "steps.1"]


def test_nested_and_rescue_ids_filled() -> None:
    flow = workflow(
        [state_step(next=[{"status": "KO", "steps": [state_step()]}])],
        rescue=[state_step()],
    )

    assert [step.id for step in flow.all_steps()] == [
        "steps.0",
        "steps.0.next.0.steps.0",
        "rescue.0",
    ]


def test_given_step_id_kept() -> None:
    flow = workflow([state_step(id="sent"), state_step()])

    assert [step.id for step in flow.steps] == ["sent", "steps.1"]


def test_duplicate_step_ids_rejected() -> None:
    with pytest.raises(ValidationError) as exc:
        workflow([state_step(id="sent"), state_step(id="sent")])

    assert "'sent' is used twice" in str(exc.value)


def test_duplicate_nested_step_id_rejected() -> None:
    with pytest.raises(ValidationError):
        workflow([state_step(id="sent", next=[{"steps": [state_step(id="sent")]}])])


def test_given_id_clashing_with_position_rejected() -> None:
    with pytest.raises(ValidationError) as exc:
        workflow([state_step(id="steps.1"), state_step()])

    assert "'steps.1' is used twice" in str(exc.value)


def test_provider_alias_sets_action() -> None:
    flow = workflow([{"provider": "silo.close"}])

    assert flow.steps[0].action == "silo.close"


def test_schema_alias_sets_schema() -> None:
    flow = workflow([state_step()], schema="bill/invoice")

    assert flow.schema_ == "bill/invoice"


def test_schema_dumped_under_alias() -> None:
    flow = workflow([state_step()], schema="bill/invoice")

    assert flow.model_dump(by_alias=True)["schema"] == "bill/invoice"


def test_steps_required() -> None:
    with pytest.raises(ValidationError):
        workflow([])


def test_unknown_step_field_rejected() -> None:
    with pytest.raises(ValidationError):
        workflow([state_step(retries=3)])


def test_draft_default_false() -> None:
    assert workflow([state_step()]).draft is False


def test_empty_next_status_means_any() -> None:
    block = Next.model_validate({"status": ""})

    assert block.status is None


@pytest.mark.parametrize("status", ["OK", "KO", "SKIP", "TIMEOUT"])
def test_next_without_status_matches_all(status: str) -> None:
    assert Next.model_validate({"status": ""}).matches(status, None)


def test_next_unknown_status_rejected() -> None:
    with pytest.raises(ValidationError):
        Next.model_validate({"status": "ERR"})


def test_next_status_matches_same() -> None:
    assert Next(status="KO").matches("KO", "not-ready")


def test_next_status_misses_other() -> None:
    assert not Next(status="KO").matches("OK", None)


def test_next_code_matches_exactly() -> None:
    assert Next(status="KO", code="not-ready").matches("KO", "not-ready")


def test_next_code_misses_other_code() -> None:
    assert not Next(status="KO", code="not-ready").matches("KO", "no-entry")


def test_next_code_misses_missing_code() -> None:
    assert not Next(code="not-ready").matches("KO", None)


def test_next_code_is_case_sensitive() -> None:
    assert not Next(code="not-ready").matches("KO", "NOT-READY")
