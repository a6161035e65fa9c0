"""Actions from other packages, through the ``transform_worker.actions`` entry points."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from contracts import Workflow
from contracts.client import JobsClient
from tests.conftest import AMQP_URL, Settings, WorkerFactory
from tests.factories import load_envelope
from worker.actions.registry import ENTRY_POINT_GROUP, default_registry
from worker.errors import Unprocessable
from worker.workflows import check_actions

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plugin"

GREETING_WORKFLOW = {
    "id": "greet",
    "steps": [{"id": "greet", "action": "hello.greet", "config": {"name": "tester"}}],
}


def install_plugin(site: Path, monkeypatch: pytest.MonkeyPatch, value: str | None = None) -> None:
    """Make the example plug-in importable and visible to importlib.metadata.

    The dist-info folder is what pip writes for an installed package; its
    entry_points.txt is built from the example's own pyproject.toml.
    """
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    points = project["project"]["entry-points"][ENTRY_POINT_GROUP]
    dist_info = site / "transform_hello-0.1.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: transform-hello\nVersion: 0.1.0\n"
    )
    lines = [f"[{ENTRY_POINT_GROUP}]"]
    lines += [f"{name} = {value or target}" for name, target in points.items()]
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(EXAMPLE))


def test_plugin_action_is_registered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_plugin(tmp_path / "site", monkeypatch)

    registry = default_registry()

    assert "hello.greet" in registry.names()
    assert "silo.state" in registry.names()


def test_unknown_action_refused_at_put() -> None:
    registry = default_registry(plugins=False)
    workflow = Workflow.model_validate(GREETING_WORKFLOW)

    with pytest.raises(Unprocessable) as raised:
        check_actions(workflow, registry)

    assert "unknown action 'hello.greet'" in raised.value.message
    assert raised.value.faults[0].code == "unknown-action"


def test_plugin_config_checked_at_put(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_plugin(tmp_path / "site", monkeypatch)
    workflow = Workflow.model_validate(
        {"id": "greet", "steps": [{"action": "hello.greet", "config": {"nmae": "typo"}}]}
    )

    with pytest.raises(Unprocessable) as raised:
        check_actions(workflow, default_registry())

    assert raised.value.faults[0].code == "invalid-config"


def test_broken_plugin_stops_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_plugin(tmp_path / "site", monkeypatch, value="transform_hello:greet")

    with pytest.raises(TypeError) as raised:
        default_registry()

    assert "must name an ActionSpec" in str(raised.value)


async def test_plugin_action_runs_in_a_job(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    start_worker: WorkerFactory,
    settings: Settings,
) -> None:
    install_plugin(tmp_path / "site", monkeypatch)
    worker = await start_worker(settings, registry=default_registry())
    await worker.put_workflow(GREETING_WORKFLOW)

    async with JobsClient(AMQP_URL, namespace=settings.amqp_namespace) as client:
        job = await client.create_job({"workflow_id": "greet", "data": load_envelope()}, wait=10)

    assert job.faults == []
    assert job.meta["greeting"] == "hello tester, from SAMPLE-001"
