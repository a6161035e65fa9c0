"""The ``transform-worker`` command line, run as a subprocess against the real broker."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uuid6
from pypdf import PdfReader

from tests.conftest import AMQP_URL, delete_topology
from tests.factories import GOBL_DIR

ROOT = Path(__file__).resolve().parents[1]
INVOICE_WORKFLOW = ROOT / "examples" / "workflows" / "invoice.yaml"
INVOICE_ENVELOPE = GOBL_DIR / "es-invoice-es-es.env.json"
SCRIPT = Path(sys.executable).with_name("transform-worker")
SHUTDOWN_GRACE_S = 5.0
SCHEMA_FILES = ["error.json", "job.create.json", "job.get.json", "job.json", "workflow.json"]


@pytest.fixture
def cli_env(tmp_path: Path, broker: str) -> Iterator[dict[str, str]]:
    """Environment for the CLI: a fresh namespace, SQLite file and data folder."""
    namespace = f"t{uuid6.uuid7().hex}"
    env = {name: value for name, value in os.environ.items() if not name.startswith("TRANSFORM_")}
    env.update(
        {
            "TRANSFORM_AMQP_URL": AMQP_URL,
            "TRANSFORM_AMQP_NAMESPACE": namespace,
            "TRANSFORM_STORE_URL": f"sqlite:///{tmp_path / 'cli.db'}",
            "TRANSFORM_DATA_DIR": str(tmp_path / "data"),
            "TRANSFORM_SQLITE_SYNCHRONOUS": "normal",
            "TRANSFORM_SHUTDOWN_GRACE_S": str(SHUTDOWN_GRACE_S),
            "TRANSFORM_SWEEP_INTERVAL_S": "0.1",
            "TRANSFORM_METRICS_HOST": "127.0.0.1",
            "TRANSFORM_METRICS_PORT": "0",
        }
    )
    yield env
    asyncio.run(delete_topology({namespace}))


def cli(
    env: dict[str, str], *args: str | Path, timeout_s: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *(str(arg) for arg in args)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@dataclass
class RunningCli:
    """A ``transform-worker run`` process whose stdout lines are collected by a thread."""

    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    arrived: queue.Queue[str] = field(default_factory=queue.Queue)

    def read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            self.arrived.put(line)

    def wait_for_event(self, event: str, timeout_s: float = 15) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.arrived.get(timeout=left)
            except queue.Empty:
                break
            record = json.loads(line)
            if record.get("event") == event:
                return record
        raise AssertionError(f"no {event} line within {timeout_s} s; stdout: {self.lines}")

    def events(self) -> list[str]:
        return [json.loads(line).get("event") for line in self.lines if line.strip()]


@contextmanager
def run_worker(env: dict[str, str], stderr_path: Path) -> Iterator[RunningCli]:
    """Start ``transform-worker run``, wait for ``worker.started``, and stop it on exit."""
    with stderr_path.open("w", encoding="utf-8") as stderr:
        process = subprocess.Popen(
            [str(SCRIPT), "run"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        worker = RunningCli(process)
        reader = threading.Thread(target=worker.read_stdout, daemon=True)
        reader.start()
        try:
            worker.wait_for_event("worker.started")
            yield worker
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=SHUTDOWN_GRACE_S + 10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            reader.join(timeout=5)
            assert process.stdout is not None
            process.stdout.close()


@pytest.fixture
def running(cli_env: dict[str, str], tmp_path: Path) -> Iterator[RunningCli]:
    """``transform-worker run`` with the invoice workflow stored, started and listening."""
    assert cli(cli_env, "workflows", "put", INVOICE_WORKFLOW).returncode == 0
    with run_worker(cli_env, tmp_path / "run.stderr") as worker:
        yield worker


def submit_invoice(env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    return cli(env, "submit", INVOICE_ENVELOPE, "--workflow", "invoice", "--wait", "10", *extra)


def test_workflows_put_prints_version(cli_env: dict[str, str]) -> None:
    result = cli(cli_env, "workflows", "put", INVOICE_WORKFLOW)

    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"default/invoice version [0-9a-f]{16}\n", result.stdout)


def test_workflows_list_shows_put(cli_env: dict[str, str]) -> None:
    put = cli(cli_env, "workflows", "put", INVOICE_WORKFLOW)
    version = put.stdout.split()[-1]

    result = cli(cli_env, "workflows", "list")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    listed_version, definition = lines[0].split("\t", 1)
    assert listed_version == version
    assert json.loads(definition)["id"] == "invoice"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("id: bad\nsteps: []\n", "invalid workflow"),
        ("id: bad\nsteps:\n  - action: silo.nothing\n", "silo.nothing"),
        ("id: bad\nsteps: [\n", "not valid JSON or YAML"),
    ],
    ids=["no-steps", "unknown-action", "broken-yaml"],
)
def test_workflows_put_invalid_file(
    cli_env: dict[str, str], tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")

    result = cli(cli_env, "workflows", "put", path)

    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    listed = cli(cli_env, "workflows", "list")
    assert listed.stdout == ""


def test_submit_prints_completed_job(cli_env: dict[str, str], running: RunningCli) -> None:
    result = submit_invoice(cli_env)

    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)
    assert job["completed_at"] is not None
    assert job["status"] == "OK"
    assert job["faults"] == []
    assert job["envelope"]["doc"]["code"] == "INV-00001"


def test_submit_failed_job_exit_status(cli_env: dict[str, str], running: RunningCli) -> None:
    party = GOBL_DIR / "es-party.json"

    result = cli(cli_env, "submit", party, "--workflow", "invoice", "--wait", "10")

    assert result.returncode == 3
    job = json.loads(result.stdout)
    assert [fault["code"] for fault in job["faults"]] == ["schema-mismatch"]


def test_run_loads_workflows_dir(cli_env: dict[str, str], tmp_path: Path) -> None:
    env = {**cli_env, "TRANSFORM_WORKFLOWS_DIR": str(INVOICE_WORKFLOW.parent)}

    with run_worker(env, tmp_path / "run.stderr") as worker:
        result = submit_invoice(env)

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["workflow_id"] == "invoice"
    assert "workflow.loaded" in worker.events()


def test_jobs_show_by_id(cli_env: dict[str, str], running: RunningCli) -> None:
    submitted = json.loads(submit_invoice(cli_env).stdout)

    result = cli(cli_env, "jobs", "show", submitted["id"])

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == submitted


def test_jobs_show_by_key(cli_env: dict[str, str], running: RunningCli) -> None:
    submitted = json.loads(submit_invoice(cli_env, "--key", "order-17").stdout)

    result = cli(cli_env, "jobs", "show", "--key", "order-17")

    assert result.returncode == 0, result.stderr
    shown_job = json.loads(result.stdout)
    assert shown_job["id"] == submitted["id"]
    assert shown_job["key"] == "order-17"


def test_jobs_show_unknown_id(cli_env: dict[str, str], running: RunningCli) -> None:
    result = cli(cli_env, "jobs", "show", str(uuid6.uuid7()))

    assert result.returncode == 1
    assert "not_found" in result.stderr


def test_run_stops_on_sigterm(running: RunningCli) -> None:
    running.process.send_signal(signal.SIGTERM)

    returncode = running.process.wait(timeout=SHUTDOWN_GRACE_S)

    assert returncode == 0
    events = running.events()
    assert "worker.started" in events
    assert events[-1] == "worker.stopped"


def test_schemas_writes_files(cli_env: dict[str, str], tmp_path: Path) -> None:
    target = tmp_path / "schemas"

    result = cli(cli_env, "schemas", target)

    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in target.iterdir()) == SCHEMA_FILES
    for name in SCHEMA_FILES:
        schema = json.loads((target / name).read_text(encoding="utf-8"))
        assert schema["$id"] == name


PDF_WORKFLOW = """
id: render
steps:
  - {id: pdf, action: pdf, config: {locale: es}}
"""


def test_jobs_attachment_writes_pdf(
    cli_env: dict[str, str], tmp_path: Path, running: RunningCli
) -> None:
    workflow = tmp_path / "render.yaml"
    workflow.write_text(PDF_WORKFLOW, encoding="utf-8")
    assert cli(cli_env, "workflows", "put", workflow).returncode == 0
    submitted = cli(cli_env, "submit", INVOICE_ENVELOPE, "--workflow", "render", "--wait", "20")
    job = json.loads(submitted.stdout)
    output = tmp_path / "out.pdf"

    written = cli(cli_env, "jobs", "attachment", job["id"], "pdf", "-o", output)
    missing = cli(cli_env, "jobs", "attachment", job["id"], "xml", "-o", tmp_path / "x")

    attachment = job["attachments"][0]
    assert written.returncode == 0
    assert output.read_bytes().startswith(b"%PDF-")
    assert output.stat().st_size == attachment["size"]
    assert hashlib.sha256(output.read_bytes()).hexdigest() == attachment["hash"]
    text = "".join(page.extract_text() for page in PdfReader(output).pages)
    assert "SAMPLE-001" in text
    assert "Factura" in text
    assert missing.returncode == 1
    assert "has no attachment 'xml'; it has: pdf" in missing.stderr
