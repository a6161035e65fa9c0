"""``sequence.enumerate``: give the document the next code of a per-workspace series."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from worker.actions.base import ActionResult, ActionSpec, StepContext, ko, ok
from worker.gobl.envelope import document_code, is_signed


class EnumerateConfig(BaseModel):
    """A series: codes are ``prefix`` + the number, zero-padded to ``padding`` digits."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._-]+$")]
    prefix: Annotated[str, Field(max_length=50)] = ""
    padding: Annotated[int, Field(ge=0, le=20)] = 0
    start: Annotated[int, Field(ge=0)] = 1


def format_code(config: EnumerateConfig, number: int) -> str:
    """Return the document code for ``number`` in the series."""
    return f"{config.prefix}{number:0{config.padding}d}"


async def enumerate_document(ctx: StepContext[EnumerateConfig]) -> ActionResult:
    """Replace the document's code with the next number of the series.

    The number is tied to the silo entry, so a step that runs again after a crash
    gets the same number back instead of leaving a gap.
    """
    envelope = ctx.envelope
    if envelope is None or ctx.entry_id is None:
        return ko("no-entry", "the job has no document to number")
    if is_signed(envelope):
        return ko("envelope-signed", "a signed envelope cannot be numbered again")
    # NOTE: if the step times out after the store assigned the number, the number stays
    # tied to this entry and reaches no document unless the entry is numbered again.
    number = await ctx.services.numbers.assign(ctx.config.name, start=ctx.config.start)
    code = format_code(ctx.config, number)
    previous = document_code(envelope)
    document = {**envelope["doc"], "code": code}
    message = f"numbered {code} in series {ctx.config.name}"
    if previous is not None and previous != code:
        message += f" (replacing {previous})"
    return ok(message, document=document)


ACTIONS = [
    ActionSpec(
        "sequence.enumerate",
        enumerate_document,
        EnumerateConfig,
        "Number the document from a gap-free series",
        # The number is tied to the entry, so a second run gets the same one back.
        idempotent=True,
        copy_envelope=False,
    ),
]
