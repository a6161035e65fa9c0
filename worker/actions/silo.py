"""Actions on the job's silo entry: its state, its folder, and closing (signing) it."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from worker.actions.base import ActionResult, ActionSpec, StepContext, ko, ok, skip
from worker.gobl.envelope import document_code, is_signed
from worker.gobl.signing import sign_envelope

Label = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._/-]+$")]


class StateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state: Label = Field(description="processing, sent, error, registered, paid, void, …")


class FolderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    folder: Label


class CloseConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


NO_ENTRY = ko(
    "no-entry",
    "the job has no silo entry; give silo_entry_id or data, "
    "or run a step that creates the document first",
)


async def set_state(ctx: StepContext[StateConfig]) -> ActionResult:
    """Set the entry's state."""
    if ctx.entry_id is None:
        return NO_ENTRY
    return ok(f"state set to {ctx.config.state}", entry_state=ctx.config.state)


async def set_folder(ctx: StepContext[FolderConfig]) -> ActionResult:
    """Move the entry to a folder."""
    if ctx.entry_id is None:
        return NO_ENTRY
    return ok(f"moved to folder {ctx.config.folder}", entry_folder=ctx.config.folder)


async def close(ctx: StepContext[CloseConfig]) -> ActionResult:
    """Sign the envelope with the worker's ES256 key; a signed envelope is left as it is."""
    envelope = ctx.envelope
    if envelope is None:
        return NO_ENTRY
    if is_signed(envelope):
        return skip("already-signed", "the envelope is already signed and cannot change")
    if document_code(envelope) is None:
        return ko(
            "not-ready",
            "the document has no code; number it first (sequence.enumerate) or send it with one",
        )
    key = await ctx.services.signing_key()
    # Stored entries are always normalised, so their digest is known to be right.
    signed = sign_envelope(envelope, key, digest_checked=True)
    return ok(f"signed with key {key.kid}", envelope=signed)


# Each can run twice with the same effect (close skips a signed envelope), and none
# changes the envelope it is given.
ACTIONS = [
    ActionSpec(
        "silo.state",
        set_state,
        StateConfig,
        "Set the silo entry's state",
        idempotent=True,
        copy_envelope=False,
    ),
    ActionSpec(
        "silo.folder",
        set_folder,
        FolderConfig,
        "Move the silo entry to a folder",
        idempotent=True,
        copy_envelope=False,
    ),
    ActionSpec(
        "silo.close",
        close,
        CloseConfig,
        "Sign the envelope (ES256 JWS)",
        idempotent=True,
        copy_envelope=False,
    ),
]
