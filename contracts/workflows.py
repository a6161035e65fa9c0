"""Workflow definitions: the ordered steps a job runs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from contracts.commands import WorkflowId, WorkspaceId

StepId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")]
ActionName = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$")]
NextStatus = Literal["OK", "KO", "SKIP", "TIMEOUT"]


class Next(BaseModel):
    """A block that runs after a step when the step's outcome matches it.

    ``status`` empty or absent matches any status; ``code``, when given, must match
    the step's result code exactly.
    """

    model_config = ConfigDict(extra="forbid")

    status: NextStatus | None = None
    code: str | None = None
    steps: list[Step] = Field(default_factory=list)
    stop: bool = Field(default=False, description="End the workflow after this block")

    @field_validator("status", mode="before")
    @classmethod
    def _empty_means_any(cls, value: Any) -> Any:
        return None if value == "" else value

    def matches(self, status: str, code: str | None) -> bool:
        """Whether a step that ended with ``status`` and ``code`` selects this block."""
        if self.status is not None and self.status != status:
            return False
        return self.code is None or self.code == code


def _document_provider_alias(schema: dict[str, Any]) -> None:
    # Pydantic writes only the first alias choice into the schema; publish both.
    properties = schema["properties"]
    properties["provider"] = {**properties["action"], "description": "Alias of action"}
    schema["required"] = [name for name in schema.get("required", []) if name != "action"]
    if not schema["required"]:
        del schema["required"]
    schema["oneOf"] = [{"required": ["action"]}, {"required": ["provider"]}]


class Step(BaseModel):
    """One action with its config; ``provider`` is accepted as an alias of ``action``."""

    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, json_schema_extra=_document_provider_alias
    )

    id: StepId | None = Field(
        default=None,
        description="Unique within the workflow; derived from the position when absent",
    )
    action: ActionName = Field(validation_alias=AliasChoices("action", "provider"))
    name: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    timeout: float | None = Field(default=None, gt=0, le=86_400, description="Seconds")
    next: list[Next] = Field(default_factory=list)


class Workflow(BaseModel):
    """A named, versioned list of steps, with rescue steps for unhandled failures.

    When ``schema`` is set, a job whose document ``$schema`` does not end with it
    fails its first step with code ``schema-mismatch``.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    id: WorkflowId
    workspace_id: WorkspaceId = "default"
    name: str | None = None
    description: str | None = None
    schema_: str | None = Field(default=None, alias="schema")
    steps: list[Step] = Field(min_length=1)
    rescue: list[Step] = Field(default_factory=list)
    draft: bool = False

    @model_validator(mode="after")
    def _assign_and_check_step_ids(self) -> Self:
        seen: set[str] = set()
        for path, step in _walk_with_paths(self):
            if step.id is None:
                step.id = path
            if step.id in seen:
                raise ValueError(f"step id {step.id!r} is used twice; step ids must be unique")
            seen.add(step.id)
        return self

    def all_steps(self) -> Iterator[Step]:
        """Yield every step, nested and rescue steps included, in definition order."""
        for _, step in _walk_with_paths(self):
            yield step


def _walk_with_paths(workflow: Workflow) -> Iterator[tuple[str, Step]]:
    yield from _walk_steps(workflow.steps, "steps")
    yield from _walk_steps(workflow.rescue, "rescue")


def _walk_steps(steps: list[Step], prefix: str) -> Iterator[tuple[str, Step]]:
    for index, step in enumerate(steps):
        path = f"{prefix}.{index}"
        yield path, step
        for block_index, block in enumerate(step.next):
            yield from _walk_steps(block.steps, f"{path}.next.{block_index}.steps")


Next.model_rebuild()
