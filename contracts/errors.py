"""The body of a ``job.rejected`` reply and event."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

ErrorKey = Literal[
    "validation",
    "conflict",
    "not_found",
    "too_large",
    "unsupported_media_type",
    "invalid_json",
    "forbidden",
]


class ErrorFault(BaseModel):
    """One problem in a rejected command, with the fields it concerns."""

    code: str
    paths: list[str] = Field(default_factory=list)
    message: str


class Error(BaseModel):
    """The reason a command was rejected, and what would have been accepted."""

    key: ErrorKey
    message: str
    faults: list[ErrorFault] = Field(default_factory=list)
    job_id: str | None = None
