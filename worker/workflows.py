"""Loading, checking, versioning and storing workflow definitions."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from contracts import Workflow
from contracts.timestamps import utc_now
from worker.actions.registry import ActionRegistry
from worker.errors import FaultDetail, Unprocessable
from worker.gobl.c14n import digest
from worker.models import WorkflowRecord
from worker.store.base import Store

WORKFLOW_SUFFIXES = (".json", ".yaml", ".yml")


def workflow_version(workflow: Workflow) -> str:
    """Return the content hash that names this version: 16 hex digits of SHA-256.

    The hash covers the normalised definition (step ids filled in, aliases resolved),
    so two files that differ only in layout or in ``provider``/``action`` spelling
    are the same version.
    """
    return digest(workflow.model_dump(mode="json", by_alias=True))[:16]


def parse_workflows(text: str, *, source: str) -> list[Workflow]:
    """Parse JSON or YAML text holding one workflow, a list of them, or YAML documents."""
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        raise Unprocessable(f"{source}: not valid JSON or YAML: {exc}") from exc
    raw: list[Any] = []
    for document in documents:
        raw.extend(document if isinstance(document, list) else [document])
    if not raw:
        raise Unprocessable(f"{source}: no workflow found")
    workflows = []
    for index, item in enumerate(raw):
        try:
            workflows.append(Workflow.model_validate(item))
        except ValidationError as exc:
            faults = [
                FaultDetail(
                    "invalid-workflow",
                    error["msg"],
                    (".".join(str(part) for part in error["loc"]),),
                )
                for error in exc.errors()
            ]
            where = f"{source} (workflow {index + 1})" if len(raw) > 1 else source
            summary = "; ".join(f"{f.paths[0] or 'workflow'}: {f.message}" for f in faults)
            raise Unprocessable(f"{where}: invalid workflow: {summary}", faults=faults) from exc
    return workflows


def load_workflow_files(paths: Iterable[Path]) -> list[Workflow]:
    """Read workflow files; a directory contributes its .json, .yaml and .yml files."""
    workflows: list[Workflow] = []
    for path in paths:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in WORKFLOW_SUFFIXES)
        else:
            files = [path]
        for file in files:
            workflows.extend(parse_workflows(file.read_text(encoding="utf-8"), source=str(file)))
    return workflows


def check_actions(workflow: Workflow, registry: ActionRegistry) -> None:
    """Raise Unprocessable when a step names an unknown action or has an invalid config."""
    faults = registry.check_workflow(workflow)
    if faults:
        summary = "; ".join(fault.message for fault in faults)
        raise Unprocessable(f"workflow {workflow.id}: {summary}", faults=faults)


async def put_workflow(
    store: Store, registry: ActionRegistry, workflow: Workflow
) -> WorkflowRecord:
    """Check a workflow against the registry and store it as the current version."""
    check_actions(workflow, registry)
    record = WorkflowRecord(
        workflow=workflow, version=workflow_version(workflow), created_at=utc_now()
    )
    existing = await store.get_workflow(workflow.workspace_id, workflow.id, record.version)
    if existing is not None:
        record = existing
    await store.put_workflow(record)
    return record


def dump_workflow(workflow: Workflow) -> str:
    """Render a workflow as the JSON that ``workflows list`` prints."""
    return json.dumps(workflow.model_dump(mode="json", by_alias=True, exclude_none=True))
