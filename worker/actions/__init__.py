"""Actions that workflow steps run, and the registry that finds them by name."""

from worker.actions.base import (
    ActionResult,
    ActionSpec,
    NewAttachment,
    NoConfig,
    Services,
    StepContext,
    ko,
    ok,
    skip,
)
from worker.actions.registry import ENTRY_POINT_GROUP, ActionRegistry, default_registry

__all__ = [
    "ENTRY_POINT_GROUP",
    "ActionRegistry",
    "ActionResult",
    "ActionSpec",
    "NewAttachment",
    "NoConfig",
    "Services",
    "StepContext",
    "default_registry",
    "ko",
    "ok",
    "skip",
]
