"""docs/logs.md lists exactly the log events the code writes, with their levels and keys."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CATALOGUE = ROOT / "docs" / "logs.md"
LEVELS = {"debug", "info", "warning", "error", "exception"}
ROW = re.compile(r"^\| `(?P<event>[a-z_.]+)` \| (?P<level>\w+) \|(?P<keys>[^|]*)\|")


def logged_events() -> dict[tuple[str, str], set[str]]:
    """Find every ``log.<level>("event", key=...)`` call under worker/: keys by event."""
    found: dict[tuple[str, str], set[str]] = defaultdict(set)
    for path in sorted((ROOT / "worker").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "log"
                and node.func.attr in LEVELS
            ):
                continue
            first = node.args[0] if node.args else None
            assert isinstance(first, ast.Constant), (
                f"{path.name}:{node.lineno}: log event names must be literal strings"
            )
            assert all(k.arg for k in node.keywords), (
                f"{path.name}:{node.lineno}: log keys must be named, not unpacked"
            )
            found[(first.value, node.func.attr)] |= {str(k.arg) for k in node.keywords}
    return found


def catalogued_events() -> dict[tuple[str, str], set[str]]:
    rows: dict[tuple[str, str], set[str]] = {}
    for line in CATALOGUE.read_text(encoding="utf-8").splitlines():
        match = ROW.match(line)
        if match:
            keys = {key.strip() for key in match["keys"].split(",") if key.strip()}
            rows[(match["event"], match["level"])] = keys
    return rows


def test_every_logged_event_is_catalogued() -> None:
    missing = set(logged_events()) - set(catalogued_events())

    assert missing == set()


def test_every_catalogued_event_is_logged() -> None:
    stale = set(catalogued_events()) - set(logged_events())

    assert stale == set()


def test_catalogue_names_every_key() -> None:
    documented = catalogued_events()
    undocumented = {
        event: sorted(keys - documented.get(event, set()))
        for event, keys in logged_events().items()
        if keys - documented.get(event, set())
    }

    assert undocumented == {}


def test_spec_event_names_present() -> None:
    names = {event for event, _ in catalogued_events()}

    assert {"job.accepted", "step.finished", "job.completed", "command.rejected"} <= names
    assert {"worker.started", "worker.stopping", "worker.stopped"} <= names
