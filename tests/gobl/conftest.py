"""Shared test data: the canonical JSON vectors and real GOBL envelopes.

The data folder sits next to the project root, outside the repository (see
``tests.factories.find_shared_data``).
Tests that take a ``vector`` argument run once per canonical JSON vector, and tests
that take an ``envelope_path`` argument run once per stored GOBL envelope.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.factories import SHARED_DATA

DATA_DIR = SHARED_DATA


def _load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "vector" in metafunc.fixturenames:
        vectors = _load_json(DATA_DIR / "c14n-vectors.json")["vectors"]
        metafunc.parametrize("vector", vectors, ids=[vector["name"] for vector in vectors])
    if "envelope_path" in metafunc.fixturenames:
        paths = sorted((DATA_DIR / "gobl").glob("*.json"))
        metafunc.parametrize("envelope_path", paths, ids=[path.name for path in paths])


@pytest.fixture
def gobl_dir() -> Path:
    """The folder of real GOBL envelopes."""
    return DATA_DIR / "gobl"


@pytest.fixture
def envelope(gobl_dir: Path) -> dict[str, Any]:
    """A real, unsigned GOBL invoice envelope whose code is ``SAMPLE-001``, with no series."""
    data: dict[str, Any] = _load_json(gobl_dir / "es-invoice-es-es-freelance.json")
    return data


@pytest.fixture
def invoice(envelope: dict[str, Any]) -> dict[str, Any]:
    """The bare invoice document taken from ``envelope``."""
    doc: dict[str, Any] = envelope["doc"]
    return doc
