"""Workspaces bound to broker users.

When ``TRANSFORM_WORKSPACE_USERS`` maps broker users to workspaces, a command's
workspace comes from its AMQP ``user_id`` property, which RabbitMQ checks against the
user of the publishing connection. A command without a mapped ``user_id`` is rejected,
as is one that names another workspace; one that names none gets its user's.
"""

from __future__ import annotations

from typing import TypeVar

from contracts import CreateJob, GetJob
from worker.errors import FaultDetail, Forbidden

Command = TypeVar("Command", CreateJob, GetJob)


class WorkspaceUsers:
    """The user-to-workspace mapping, or nothing when workspaces are not bound to users."""

    def __init__(self, mapping: dict[str, str]) -> None:
        self.mapping = dict(mapping)

    @property
    def active(self) -> bool:
        return bool(self.mapping)

    def scope(self, command: Command, user_id: str | None) -> Command:
        """Return the command with its user's workspace, or raise Forbidden."""
        if not self.active:
            return command
        workspace = self.mapping.get(user_id or "")
        if workspace is None:
            who = f"user {user_id!r}" if user_id else "a message without user_id"
            raise Forbidden(
                f"commands must carry the AMQP user_id of a broker user bound to a workspace; "
                f"{who} is not",
                faults=[FaultDetail("user-not-bound", "no workspace for this user", ("user_id",))],
            )
        if "workspace_id" not in command.model_fields_set:
            return command.model_copy(update={"workspace_id": workspace})
        if command.workspace_id != workspace:
            raise Forbidden(
                f"user {user_id!r} may only use workspace {workspace}, not {command.workspace_id}",
                faults=[FaultDetail("other-workspace", "workspace not allowed", ("workspace_id",))],
            )
        return command
