"""The committed JSON Schema files: up to date, and true to the messages they describe."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import uuid6
import yaml
from jsonschema import Draft202012Validator

from contracts import Attachment, Error, ErrorFault, Event, Fault, Intent, Job, Status
from contracts.schemas import DEFAULT_DIR, SCHEMA_MODELS, render_schema
from contracts.timestamps import utc_now
from tests.factories import load_envelope

EXAMPLE_WORKFLOW = Path(__file__).resolve().parents[2] / "examples" / "workflows" / "invoice.yaml"


def committed(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((DEFAULT_DIR / f"{name}.json").read_text("utf-8"))
    return schema


def validate(name: str, instance: Any) -> list[str]:
    """Return one message per rule of the committed schema that ``instance`` breaks."""
    validator = Draft202012Validator(committed(name))
    return [f"{error.json_path}: {error.message}" for error in validator.iter_errors(instance)]


def sample_job() -> dict[str, Any]:
    """A finished job with every nested record filled in, as a reply carries it."""
    now = utc_now()
    envelope = load_envelope()
    job = Job(
        id=str(uuid6.uuid7()),
        workspace_id="default",
        workflow_id="invoice",
        workflow_version="0123456789abcdef",
        silo_entry_id=envelope["head"]["uuid"],
        key="order-42",
        meta={"order": "42"},
        tags=["q3"],
        status=Status.KO,
        intents=[
            Intent(
                id=str(uuid6.uuid7()),
                step_id="sign",
                action="silo.close",
                events=[
                    Event(index=0, status=Status.RUN, at=now),
                    Event(index=1, status=Status.KO, at=now, code="not-ready", message="no code"),
                ],
                completed=True,
                created_at=now,
                updated_at=now,
            )
        ],
        faults=[Fault(action="silo.close", code="not-ready", message="no code")],
        attachments=[
            Attachment(
                id=str(uuid6.uuid7()),
                key="pdf",
                name="invoice.pdf",
                mime="application/pdf",
                size=1024,
                hash="0" * 64,
            )
        ],
        envelope=envelope,
        created_at=now,
        updated_at=now,
        completed_at=now,
    )
    return job.model_dump(mode="json")


@pytest.mark.parametrize("name", sorted(SCHEMA_MODELS))
def test_committed_schema_current(name: str) -> None:
    committed_text = (DEFAULT_DIR / f"{name}.json").read_text("utf-8")

    assert committed_text == render_schema(name), (
        f"contracts/schemas/{name}.json is stale; run `python -m contracts.schemas`"
    )


def test_schema_files_match_models() -> None:
    files = {path.name.removesuffix(".json") for path in DEFAULT_DIR.glob("*.json")}

    assert files == set(SCHEMA_MODELS)


@pytest.mark.parametrize("name", sorted(SCHEMA_MODELS))
def test_schema_declares_draft_and_id(name: str) -> None:
    schema = committed(name)

    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"{name}.json"


def test_create_schema_structure() -> None:
    schema = committed("job.create")

    assert schema["required"] == ["workflow_id"]
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) >= {
        "id",
        "workspace_id",
        "workflow_id",
        "silo_entry_id",
        "data",
        "meta",
        "key",
        "tags",
        "wait",
    }


def test_job_schema_structure() -> None:
    schema = committed("job")

    assert set(schema["required"]) >= {"id", "workspace_id", "workflow_id", "created_at"}
    assert set(schema["properties"]) >= {
        "silo_entry_id",
        "key",
        "meta",
        "tags",
        "status",
        "intents",
        "faults",
        "attachments",
        "envelope",
        "updated_at",
        "completed_at",
    }


def test_create_schema_accepts_envelope_command() -> None:
    command = {
        "id": str(uuid6.uuid7()),
        "workspace_id": "acme",
        "workflow_id": "invoice",
        "data": load_envelope(),
        "key": "order-42",
        "tags": ["q3"],
        "wait": 30,
    }

    assert validate("job.create", command) == []


def test_create_schema_accepts_meta_command() -> None:
    assert validate("job.create", {"workflow_id": "invoice", "meta": {"order": "42"}}) == []


def test_create_schema_accepts_args_alias() -> None:
    # The worker accepts `args` for `meta`, so a publisher checking against the schema must too.
    assert validate("job.create", {"workflow_id": "invoice", "args": {"order": "42"}}) == []


def test_create_schema_rejects_unknown_field() -> None:
    errors = validate("job.create", {"workflow_id": "invoice", "meta": {}, "colour": "red"})

    assert errors == ["$: Additional properties are not allowed ('colour' was unexpected)"]


def test_create_schema_rejects_string_wait() -> None:
    errors = validate("job.create", {"workflow_id": "invoice", "meta": {}, "wait": "5"})

    assert len(errors) == 1
    assert errors[0].startswith("$.wait: ")


def test_create_schema_rejects_wait_over_limit() -> None:
    errors = validate("job.create", {"workflow_id": "invoice", "meta": {}, "wait": 3601})

    assert len(errors) == 1
    assert errors[0].startswith("$.wait: ")


def test_create_schema_requires_workflow() -> None:
    assert validate("job.create", {"meta": {}}) == ["$: 'workflow_id' is a required property"]


def test_get_schema_accepts_id_query() -> None:
    assert validate("job.get", {"id": str(uuid6.uuid7())}) == []


def test_get_schema_accepts_key_query() -> None:
    assert validate("job.get", {"workspace_id": "acme", "key": "order-42"}) == []


def test_job_schema_accepts_finished_job() -> None:
    assert validate("job", sample_job()) == []


def test_job_schema_rejects_unknown_status() -> None:
    job = sample_job()
    job["status"] = "DONE"

    errors = validate("job", job)

    assert len(errors) == 1
    assert errors[0].startswith("$.status: 'DONE' is not one of")


def test_error_schema_accepts_conflict() -> None:
    error = Error(
        key="conflict",
        message="key 'order-42' is already used by job 0190…",
        faults=[ErrorFault(code="key-taken", paths=["key"], message="key already used")],
        job_id=str(uuid6.uuid7()),
    )

    assert validate("error", error.model_dump(mode="json")) == []


def test_error_schema_rejects_unknown_key() -> None:
    errors = validate("error", {"key": "teapot", "message": "short and stout"})

    assert len(errors) == 1


def test_workflow_schema_accepts_example() -> None:
    definition = yaml.safe_load(EXAMPLE_WORKFLOW.read_text("utf-8"))

    assert validate("workflow", definition) == []


def test_workflow_schema_accepts_provider_alias() -> None:
    # The worker accepts `provider` for `action`, so the schema must too.
    definition = {"id": "close", "steps": [{"provider": "silo.close"}]}

    assert validate("workflow", definition) == []
