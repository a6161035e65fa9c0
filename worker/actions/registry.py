"""The action registry: built-in actions plus those of installed plug-in packages."""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import entry_points

from pydantic import ValidationError

from contracts import Workflow
from worker.actions.base import ActionSpec
from worker.errors import FaultDetail

#: Entry-point group through which other packages add actions.
ENTRY_POINT_GROUP = "transform_worker.actions"


class ActionRegistry:
    """Actions by name."""

    def __init__(self, specs: Iterable[ActionSpec] = ()) -> None:
        self._specs: dict[str, ActionSpec] = {}
        for spec in specs:
            self.register(spec)

    def register(self, spec: ActionSpec) -> None:
        """Add an action; a second action with the same name raises ValueError."""
        if spec.name in self._specs:
            raise ValueError(f"action {spec.name!r} is registered twice")
        self._specs[spec.name] = spec

    def get(self, name: str) -> ActionSpec | None:
        return self._specs.get(name)

    def names(self) -> list[str]:
        return sorted(self._specs)

    def check_workflow(self, workflow: Workflow) -> list[FaultDetail]:
        """Return a fault for every step whose action is unknown or whose config is invalid."""
        faults: list[FaultDetail] = []
        for step in workflow.all_steps():
            path = f"steps[{step.id}]"
            spec = self._specs.get(step.action)
            if spec is None:
                faults.append(
                    FaultDetail(
                        "unknown-action",
                        f"step {step.id} uses unknown action {step.action!r}; "
                        f"known actions: {', '.join(self.names())}",
                        (f"{path}.action",),
                    )
                )
                continue
            try:
                spec.parse_config(step.config)
            except ValidationError as exc:
                for error in exc.errors():
                    where = ".".join(str(part) for part in error["loc"])
                    faults.append(
                        FaultDetail(
                            "invalid-config",
                            f"step {step.id} ({step.action}): config {where or 'object'}: "
                            f"{error['msg']}",
                            (f"{path}.config.{where}" if where else f"{path}.config",),
                        )
                    )
        return faults


def builtin_actions() -> list[ActionSpec]:
    """Return the actions that ship with the worker."""
    from worker.actions import pdf, sequence, silo, webhook

    return [*silo.ACTIONS, *sequence.ACTIONS, *webhook.ACTIONS, *pdf.ACTIONS]


def plugin_actions() -> list[ActionSpec]:
    """Load the actions that installed packages declare under ``transform_worker.actions``.

    Each entry point names an ``ActionSpec`` or a list of them. A plug-in that fails to
    import or names something else raises, so that a worker never starts with an action
    silently missing.
    """
    specs: list[ActionSpec] = []
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        loaded = entry_point.load()
        items = loaded if isinstance(loaded, list | tuple) else [loaded]
        for item in items:
            if not isinstance(item, ActionSpec):
                raise TypeError(
                    f"entry point {entry_point.name!r} ({entry_point.value}) in group "
                    f"{ENTRY_POINT_GROUP} must name an ActionSpec or a list of them, "
                    f"not {type(item).__name__}"
                )
            specs.append(item)
    return specs


def default_registry(*, plugins: bool = True) -> ActionRegistry:
    """Return a registry of the built-in actions and, unless disabled, the plug-ins."""
    specs = builtin_actions()
    if plugins:
        specs += plugin_actions()
    return ActionRegistry(specs)
