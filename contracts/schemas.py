"""JSON Schema documents for every command and reply, for publishers in other languages.

``python -m contracts.schemas [DIR]`` (or ``transform-worker schemas``) writes them to
``contracts/schemas/`` by default. A test fails when the committed files are stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from contracts.commands import CreateJob, GetJob
from contracts.errors import Error
from contracts.jobs import Job
from contracts.workflows import Workflow

#: File stem → model. Commands are validated on input, replies on output.
SCHEMA_MODELS: dict[str, type[BaseModel]] = {
    "job.create": CreateJob,
    "job.get": GetJob,
    "job": Job,
    "error": Error,
    "workflow": Workflow,
}

DEFAULT_DIR = Path(__file__).parent / "schemas"


def build_schema(name: str) -> dict[str, Any]:
    """Return the JSON Schema of the model registered as ``name``."""
    model = SCHEMA_MODELS[name]
    mode: Literal["validation", "serialization"] = (
        "validation" if name in {"job.create", "job.get", "workflow"} else "serialization"
    )
    schema = model.model_json_schema(by_alias=True, mode=mode)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"{name}.json",
        **schema,
    }


def render_schema(name: str) -> str:
    """Return the schema file text for ``name``: sorted keys, two-space indent."""
    return json.dumps(build_schema(name), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_schemas(directory: Path = DEFAULT_DIR) -> list[Path]:
    """Write one ``<name>.json`` file per model into ``directory`` and return the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SCHEMA_MODELS:
        path = directory / f"{name}.json"
        path.write_text(render_schema(name), encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR
    for written in write_schemas(target):
        print(written)
