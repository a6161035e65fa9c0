"""Small pure helpers on intents, events and step outcomes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import uuid6
from pydantic import ValidationError

from contracts import Attachment, Event, Intent, Next, Status, Step
from contracts.timestamps import utc_now
from worker.actions.base import RESULT_STATUSES, ActionResult
from worker.gobl.envelope import normalise_envelope
from worker.models import EntryRecord, JobRecord


@dataclass(frozen=True)
class StepOutcome:
    """The status and code a step ended with, which steer the flow."""

    status: Status
    code: str | None


def open_intent(job: JobRecord, step: Step) -> Intent:
    """Return the step's unfinished intent (a retry), or a new one."""
    for intent in job.intents:
        if intent.step_id == step.id and not intent.completed:
            return intent.model_copy()
    now = utc_now()
    return Intent(
        id=str(uuid6.uuid7()),
        step_id=step.id or "",
        name=step.name,
        action=step.action,
        created_at=now,
        updated_at=now,
    )


def put_intent(job: JobRecord, intent: Intent) -> None:
    """Add the intent to the job, or replace the one with its id."""
    # Intents are shared between the job and the runner, which is safe because events
    # are only ever added by replacing the list (see add_event), never in place.
    for index, existing in enumerate(job.intents):
        if existing.id == intent.id:
            job.intents[index] = intent.model_copy()
            return
    job.intents.append(intent.model_copy())


def add_event(
    intent: Intent,
    status: Status,
    *,
    code: str | None = None,
    message: str | None = None,
    now: datetime | None = None,
) -> None:
    """Append an event to the intent (as a new list, so copies never share it)."""
    at = now or utc_now()
    event = Event(index=len(intent.events), status=status, at=at, code=code, message=message)
    intent.events = [*intent.events, event]
    intent.updated_at = at


def matching_block(step: Step, outcome: StepOutcome) -> Next | None:
    """Return the first next block of the step that the outcome selects."""
    for block in step.next:
        if block.matches(outcome.status, outcome.code):
            return block
    return None


def forced_fault(outcome: StepOutcome) -> bool:
    """Return whether the outcome is a fault that no next block can take (a wrong document type)."""
    return outcome.status is Status.KO and outcome.code == "schema-mismatch"


def unhandled(step: Step, outcome: StepOutcome) -> bool:
    """Return whether the outcome is a KO or TIMEOUT that records a fault."""
    if outcome.status not in (Status.KO, Status.TIMEOUT):
        return False
    return forced_fault(outcome) or matching_block(step, outcome) is None


def checked_result(result: object, step: Step) -> ActionResult:
    """Return an action's result, or a KO when it returned something it may not."""
    if isinstance(result, ActionResult) and result.status in RESULT_STATUSES:
        return result
    got = result.status if isinstance(result, ActionResult) else type(result).__name__
    return ActionResult(
        Status.KO,
        "invalid-result",
        f"action {step.action} returned {got}; actions return an ActionResult with status "
        "OK, SKIP, KO or QUEUED, and raise TransientError to be retried",
    )


def checked_envelope(envelope: dict[str, Any], entry: EntryRecord | None) -> dict[str, Any]:
    """Return an envelope an action produced, normalised.

    When the document and its digest are those of the stored entry (the action only
    added a signature, say), the digest is known to be right and is not computed again.
    """
    if entry is not None:
        stored = entry.envelope
        head = envelope.get("head")
        same_document = envelope.get("doc") == stored.get("doc")
        if same_document and isinstance(head, dict) and head == stored.get("head"):
            return envelope
    return normalise_envelope(envelope)


def clone_json(value: Any) -> Any:
    """Copy a JSON-like value (dicts, lists, scalars); several times faster than deepcopy."""
    if isinstance(value, dict):
        return {key: clone_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [clone_json(item) for item in value]
    return value


def merge_attachments(current: list[Attachment], new: list[Attachment]) -> list[Attachment]:
    """Return ``current`` with ``new`` added; a new attachment replaces one with its key."""
    keys = {attachment.key for attachment in new}
    return [a for a in current if a.key not in keys] + list(new)


def first_config_error(exc: ValidationError) -> str:
    """Return a one-line description of the first error in a step's config."""
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"config {where}: {error['msg']}" if where else f"config: {error['msg']}"
