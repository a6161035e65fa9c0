"""Validation rules of the ``job.create`` and ``job.get`` command bodies."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import uuid6
from pydantic import ValidationError

from contracts import CreateJob, GetJob

V4_ID = "1b4e28ba-2fa1-41d2-883f-0016d3cca427"


def create(**fields: Any) -> CreateJob:
    """Validate a create-job body with a workflow and meta unless the test overrides them."""
    body: dict[str, Any] = {"workflow_id": "invoice", "meta": {"order": "42"}}
    body.update(fields)
    return CreateJob.model_validate(body)


def error_messages(exc: pytest.ExceptionInfo[ValidationError]) -> str:
    return " | ".join(str(error["msg"]) for error in exc.value.errors())


def test_id_v7_accepted() -> None:
    job_id = str(uuid6.uuid7())

    assert create(id=job_id).id == job_id


def test_id_v1_accepted() -> None:
    job_id = str(uuid.uuid1())

    assert create(id=job_id).id == job_id


def test_id_uppercase_made_canonical() -> None:
    job_id = str(uuid6.uuid7())

    assert create(id=job_id.upper()).id == job_id


def test_id_v4_rejected() -> None:
    with pytest.raises(ValidationError) as exc:
        create(id=V4_ID)

    message = error_messages(exc)
    assert "version 4" in message
    assert "version 7 or 1" in message


def test_id_not_uuid_rejected() -> None:
    with pytest.raises(ValidationError) as exc:
        create(id="job-42")

    assert "not a UUID" in error_messages(exc)


def test_id_absent_left_to_worker() -> None:
    assert create().id is None


def test_meta_accepted() -> None:
    assert create(meta={"order": "42"}).meta == {"order": "42"}


def test_args_alias_fills_meta() -> None:
    command = CreateJob.model_validate({"workflow_id": "invoice", "args": {"order": "42"}})

    assert command.meta == {"order": "42"}


def test_meta_and_args_rejected() -> None:
    with pytest.raises(ValidationError) as exc:
        CreateJob.model_validate({"workflow_id": "invoice", "meta": {"a": "1"}, "args": {"b": "2"}})

    message = error_messages(exc)
    assert "meta" in message
    assert "args" in message


def test_meta_values_must_be_strings() -> None:
    with pytest.raises(ValidationError):
        create(meta={"count": 3})


@pytest.mark.parametrize(
    "inputs",
    [
        {"silo_entry_id": "0190a9d4-7b1e-7c3a-9f00-000000000001"},
        {"data": {"$schema": "https://gobl.org/draft-0/bill/invoice"}},
        {"meta": {"order": "42"}},
    ],
    ids=["silo_entry_id", "data", "meta"],
)
def test_one_input_enough(inputs: dict[str, Any]) -> None:
    command = CreateJob.model_validate({"workflow_id": "invoice", **inputs})

    assert command.workflow_id == "invoice"


def test_no_input_rejected() -> None:
    with pytest.raises(ValidationError) as exc:
        CreateJob.model_validate({"workflow_id": "invoice"})

    message = error_messages(exc)
    assert "silo_entry_id" in message
    assert "data" in message
    assert "meta" in message


def test_silo_entry_id_must_be_uuid() -> None:
    with pytest.raises(ValidationError):
        create(silo_entry_id="entry-1")


def test_workflow_id_required() -> None:
    with pytest.raises(ValidationError) as exc:
        CreateJob.model_validate({"meta": {"order": "42"}})

    assert [error["loc"] for error in exc.value.errors()] == [("workflow_id",)]


@pytest.mark.parametrize("wait", [0, 1, 3600])
def test_wait_in_range_accepted(wait: int) -> None:
    assert create(wait=wait).wait == wait


@pytest.mark.parametrize(
    "wait",
    ["5", 5.0, 2.5, True, False, 3601, -1],
    ids=["string", "whole-float", "float", "true", "false", "3601", "negative"],
)
def test_wait_invalid_rejected(wait: Any) -> None:
    with pytest.raises(ValidationError) as exc:
        create(wait=wait)

    assert [error["loc"] for error in exc.value.errors()] == [("wait",)]


def test_wait_null_means_no_deadline() -> None:
    assert create(wait=None).wait is None


def test_key_255_chars_accepted() -> None:
    key = "k" * 255

    assert create(key=key).key == key


def test_key_256_chars_rejected() -> None:
    with pytest.raises(ValidationError) as exc:
        create(key="k" * 256)

    assert [error["loc"] for error in exc.value.errors()] == [("key",)]


def test_key_empty_rejected() -> None:
    with pytest.raises(ValidationError):
        create(key="")


def test_unknown_field_rejected() -> None:
    with pytest.raises(ValidationError) as exc:
        create(colour="red")

    errors = exc.value.errors()
    assert [error["loc"] for error in errors] == [("colour",)]
    assert errors[0]["type"] == "extra_forbidden"


def test_workspace_default() -> None:
    assert create().workspace_id == "default"


@pytest.mark.parametrize("workspace_id", ["acme", "acme-eu.2", "A_1"])
def test_workspace_pattern_accepted(workspace_id: str) -> None:
    assert create(workspace_id=workspace_id).workspace_id == workspace_id


@pytest.mark.parametrize(
    "workspace_id",
    ["", "-acme", ".acme", "acme corp", "acme/eu", "a" * 65],
    ids=["empty", "leading-dash", "leading-dot", "space", "slash", "too-long"],
)
def test_workspace_pattern_rejected(workspace_id: str) -> None:
    with pytest.raises(ValidationError) as exc:
        create(workspace_id=workspace_id)

    assert [error["loc"] for error in exc.value.errors()] == [("workspace_id",)]


def test_tags_must_be_strings() -> None:
    with pytest.raises(ValidationError):
        create(tags=[1])


def test_get_by_id() -> None:
    job_id = str(uuid6.uuid7())

    query = GetJob.model_validate({"id": job_id})

    assert query.id == job_id
    assert query.key is None
    assert query.workspace_id == "default"


def test_get_by_key() -> None:
    query = GetJob.model_validate({"workspace_id": "acme", "key": "order-42"})

    assert query.key == "order-42"
    assert query.id is None


def test_get_id_and_key_rejected() -> None:
    with pytest.raises(ValidationError) as exc:
        GetJob.model_validate({"id": str(uuid6.uuid7()), "key": "order-42"})

    assert "exactly one of id and key" in error_messages(exc)


def test_get_neither_rejected() -> None:
    with pytest.raises(ValidationError) as exc:
        GetJob.model_validate({"workspace_id": "acme"})

    assert "exactly one of id and key" in error_messages(exc)


def test_get_unknown_field_rejected() -> None:
    with pytest.raises(ValidationError):
        GetJob.model_validate({"id": str(uuid6.uuid7()), "wait": 5})
