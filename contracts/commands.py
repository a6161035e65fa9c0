"""Commands that publishers send to ``transform.commands``."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Self

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    model_validator,
)

#: Routing key of a create-job command.
CREATE_JOB = "job.create"
#: Routing key of a get-job command.
GET_JOB = "job.get"

#: Pattern for workspace and workflow ids: letters, digits, ``-``, ``_`` and ``.``.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"

#: UUID versions that carry a timestamp and so sort by creation time.
TIME_BASED_VERSIONS = (7, 1)


def quote(value: object, limit: int = 80) -> str:
    """Return ``repr(value)``, cut to ``limit`` characters with an ellipsis when longer."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def canonical_uuid(value: str) -> str:
    """Return ``value`` as a canonical lowercase UUID string, or raise ValueError."""
    try:
        parsed = uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise ValueError(f"{quote(value)} is not a UUID") from None
    return str(parsed)


def time_based_uuid(value: str) -> str:
    """Validate a job id: a UUID of version 7 or 1, returned in canonical form."""
    text = canonical_uuid(value)
    version = uuid.UUID(text).version
    if version not in TIME_BASED_VERSIONS:
        raise ValueError(
            f"id {text} is a version {version} UUID; jobs need a time-based UUID (version 7 or 1)"
        )
    return text


UuidString = Annotated[
    str, AfterValidator(canonical_uuid), Field(json_schema_extra={"format": "uuid"})
]
JobId = Annotated[str, AfterValidator(time_based_uuid), Field(json_schema_extra={"format": "uuid"})]
WorkspaceId = Annotated[str, Field(min_length=1, max_length=64, pattern=ID_PATTERN)]
WorkflowId = Annotated[str, Field(min_length=1, max_length=128, pattern=ID_PATTERN)]
JobKey = Annotated[str, Field(min_length=1, max_length=255)]
Tag = Annotated[str, Field(min_length=1, max_length=100)]


def _document_args_alias(schema: dict[str, Any]) -> None:
    # Pydantic writes only the first alias choice into the schema; publish both.
    properties = schema["properties"]
    properties["args"] = {**properties["meta"], "description": "Alias of meta"}
    schema["not"] = {"required": ["meta", "args"]}
    schema["anyOf"] = [{"required": [name]} for name in ("silo_entry_id", "data", "meta", "args")]


class CreateJob(BaseModel):
    """Body of a ``job.create`` command.

    At least one of ``silo_entry_id``, ``data`` and ``meta`` is required. When several
    are given, ``silo_entry_id`` wins, then ``data``.
    """

    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, json_schema_extra=_document_args_alias
    )

    id: JobId | None = Field(
        default=None,
        description="Job id, a UUID v7 or v1; the worker makes a v7 when absent",
    )
    workspace_id: WorkspaceId = "default"
    workflow_id: WorkflowId
    silo_entry_id: UuidString | None = Field(
        default=None, description="An existing silo entry of the workspace"
    )
    data: dict[str, Any] | None = Field(
        default=None,
        description="A GOBL envelope or bare GOBL document, stored as a new silo entry",
    )
    meta: dict[str, str] | None = Field(
        default=None,
        validation_alias=AliasChoices("meta", "args"),
        description="Application data for the first steps; `args` is accepted as an alias",
    )
    key: JobKey | None = Field(
        default=None, description="Idempotency key, unique per workspace for 2 years"
    )
    tags: list[Tag] = Field(default_factory=list, max_length=50)
    wait: Annotated[StrictInt, Field(ge=0, le=3600)] | None = Field(
        default=None,
        description="Seconds to wait for completion before a job.pending reply; 0 replies at once",
    )

    @model_validator(mode="before")
    @classmethod
    def _one_of_meta_or_args(cls, data: Any) -> Any:
        if isinstance(data, dict) and "meta" in data and "args" in data:
            raise ValueError("give either meta or its alias args, not both")
        return data

    @model_validator(mode="after")
    def _has_input(self) -> Self:
        if self.silo_entry_id is None and self.data is None and self.meta is None:
            raise ValueError(
                "a job needs an input: silo_entry_id (an existing entry), "
                "data (a GOBL envelope or document) or meta"
            )
        return self


class GetJob(BaseModel):
    """Body of a ``job.get`` command: a job by ``id`` or by ``key``, not both."""

    model_config = ConfigDict(extra="forbid")

    workspace_id: WorkspaceId = "default"
    id: UuidString | None = None
    key: JobKey | None = None

    @model_validator(mode="after")
    def _id_or_key(self) -> Self:
        if (self.id is None) == (self.key is None):
            raise ValueError("give exactly one of id and key")
        return self
