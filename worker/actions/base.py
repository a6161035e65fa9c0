"""The inputs and outputs of an action.

An action is an async callable registered under a dotted name such as ``silo.state``.
It gets a ``StepContext`` (the job's ids and meta, a copy of the envelope, its
validated config and the services the engine lends it) and returns an ``ActionResult``
or raises ``worker.errors.TransientError`` to be retried. Actions never touch the
broker or the database directly: the engine stores what the result describes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict

from contracts import Status
from worker.gobl.signing import SigningKey

ConfigT = TypeVar("ConfigT", bound=BaseModel)

#: Statuses an action may return; ERR is raised as TransientError instead. The engine
#: turns any other status into a KO with code ``invalid-result``.
RESULT_STATUSES = frozenset({Status.OK, Status.SKIP, Status.KO, Status.QUEUED})


class NoConfig(BaseModel):
    """Config of an action that takes none: an empty object."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class NewAttachment:
    """A file an action produced, stored by the engine on the job and its entry."""

    key: str
    name: str
    mime: str
    data: bytes
    desc: str | None = None
    category: str | None = None


@dataclass(frozen=True)
class ActionResult:
    """The outcome of one step.

    ``envelope`` replaces the whole envelope (``silo.close`` uses it to add a
    signature); ``document`` replaces only ``doc`` and makes the engine recompute the
    digest. ``meta`` is merged into the job's meta. ``retry_in_s`` sets when a
    ``QUEUED`` step is polled again.
    """

    status: Status = Status.OK
    code: str | None = None
    message: str | None = None
    meta: Mapping[str, str] = field(default_factory=dict)
    document: dict[str, Any] | None = None
    envelope: dict[str, Any] | None = None
    entry_state: str | None = None
    entry_folder: str | None = None
    attachments: Sequence[NewAttachment] = ()
    retry_in_s: float | None = None


def ok(message: str | None = None, **changes: Any) -> ActionResult:
    """Build an OK result."""
    return ActionResult(Status.OK, message=message, **changes)


def skip(code: str, message: str) -> ActionResult:
    """Build a SKIP result: nothing to do, the flow goes on."""
    return ActionResult(Status.SKIP, code=code, message=message)


def ko(code: str, message: str) -> ActionResult:
    """Build a KO result: the step failed for good."""
    return ActionResult(Status.KO, code=code, message=message)


class NumberSeries(Protocol):
    """Hands out gap-free numbers of a per-workspace series, one per silo entry."""

    async def assign(self, series: str, *, start: int) -> int:
        """Return the number of ``series`` for the current entry, assigning one if needed."""
        ...


@dataclass(frozen=True)
class Services:
    """Services the engine lends to actions."""

    numbers: NumberSeries
    signing_key: Callable[[], Awaitable[SigningKey]]
    webhook_allow_hosts: frozenset[str] = frozenset()
    #: Shared HTTP client; it does not follow redirects.
    http: httpx.AsyncClient | None = None


@dataclass(frozen=True)
class StepContext(Generic[ConfigT]):
    """Everything an action may read about the job it runs in."""

    job_id: str
    workspace_id: str
    workflow_id: str
    step_id: str
    key: str | None
    tags: Sequence[str]
    meta: Mapping[str, str]
    config: ConfigT
    #: A private copy of the envelope; None when the job has no entry yet.
    envelope: dict[str, Any] | None
    entry_id: str | None
    entry_state: str | None
    entry_folder: str | None
    services: Services
    #: Faults recorded so far, for rescue steps that report them.
    faults: Sequence[Mapping[str, Any]] = ()


ActionFunc = Callable[[StepContext[Any]], Awaitable[ActionResult]]


@dataclass(frozen=True)
class ActionSpec:
    """A registered action: its name, code and config model."""

    name: str
    run: ActionFunc
    config_model: type[BaseModel] = NoConfig
    description: str = ""
    #: Running the action twice has the effect of running it once, so its result may
    #: wait in memory for the job's next write. Actions with outside effects (a
    #: webhook) leave this False: the job is written before and after them.
    idempotent: bool = False
    #: Give the action a private copy of the envelope. Only actions that never change
    #: ``ctx.envelope`` in place may set this to False, which skips the copy.
    copy_envelope: bool = True

    def parse_config(self, config: Mapping[str, Any]) -> BaseModel:
        """Validate a step's config; raises pydantic.ValidationError."""
        return self.config_model.model_validate(dict(config))
