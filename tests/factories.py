"""Builders for records used across the test suite."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import uuid6

from contracts import Workflow
from contracts.timestamps import utc_now
from worker.models import EntryRecord, JobRecord, OutboxItem, WorkflowRecord


def find_shared_data() -> Path:
    """Return the shared test data folder: ``TRANSFORM_TEST_SHARED_DATA``, or the
    ``shared/data`` folder next to the project root.

    Raises instead of returning an empty folder, so that data-driven tests cannot pass
    by running no cases.
    """
    configured = os.environ.get("TRANSFORM_TEST_SHARED_DATA")
    folder = (
        Path(configured)
        if configured
        else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    )
    if not (folder / "gobl").is_dir() or not (folder / "c14n-vectors.json").is_file():
        raise RuntimeError(
            f"the shared GOBL test data is not in {folder}; set TRANSFORM_TEST_SHARED_DATA "
            "to the folder that holds gobl/ and c14n-vectors.json"
        )
    return folder


SHARED_DATA = find_shared_data()
GOBL_DIR = SHARED_DATA / "gobl"


def load_envelope(name: str = "es-invoice-es-es.env.json") -> dict[str, Any]:
    """Return one of the shared GOBL envelopes, parsed."""
    return json.loads((GOBL_DIR / name).read_text(encoding="utf-8"))


def all_envelope_paths() -> list[Path]:
    return sorted(GOBL_DIR.glob("*.json"))


def new_id() -> str:
    return str(uuid6.uuid7())


def job_record(
    *,
    workspace_id: str = "default",
    key: str | None = None,
    created_at: datetime | None = None,
    due_in_s: float | None = 0.0,
    **fields: Any,
) -> JobRecord:
    now = created_at or utc_now()
    values: dict[str, Any] = {
        "id": new_id(),
        "workspace_id": workspace_id,
        "workflow_id": "invoice",
        "workflow_version": "v1",
        "key": key,
        "fingerprint": "f" * 64,
        "created_at": now,
        "updated_at": now,
        "due_at": None if due_in_s is None else now + timedelta(seconds=due_in_s),
    }
    values.update(fields)
    return JobRecord.model_validate(values)


def entry_record(*, workspace_id: str = "default", key: str | None = None) -> EntryRecord:
    envelope = load_envelope()
    now = utc_now()
    return EntryRecord(
        id=new_id(),
        workspace_id=workspace_id,
        key=key,
        envelope=envelope,
        created_at=now,
        updated_at=now,
    )


def reply_item(**fields: Any) -> OutboxItem:
    values: dict[str, Any] = {
        "id": new_id(),
        "kind": "reply",
        "reply_to": "caller",
        "correlation_id": "c1",
        "created_at": utc_now(),
    }
    values.update(fields)
    return OutboxItem.model_validate(values)


def workflow_record(
    workflow_id: str = "invoice",
    *,
    workspace_id: str = "default",
    version: str = "v1",
    **extra: Any,
) -> WorkflowRecord:
    workflow = Workflow.model_validate(
        {
            "id": workflow_id,
            "workspace_id": workspace_id,
            "steps": [{"action": "silo.state", "config": {"state": version}}],
            **extra,
        }
    )
    return WorkflowRecord(workflow=workflow, version=version, created_at=utc_now())
