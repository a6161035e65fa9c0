"""An example action plug-in: ``hello.greet`` adds a greeting to the job's meta."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from worker.actions import ActionResult, ActionSpec, StepContext, ko, ok


class GreetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)


async def greet(ctx: StepContext[GreetConfig]) -> ActionResult:
    """Put ``greeting`` in the job's meta, or fail when the job has no document."""
    if ctx.envelope is None:
        return ko("no-document", "hello.greet needs a document to greet")
    code = ctx.envelope["doc"].get("code", "?")
    return ok("greeted", meta={"greeting": f"hello {ctx.config.name}, from {code}"})


ACTIONS = [ActionSpec("hello.greet", greet, GreetConfig, "Add a greeting to the job's meta")]
