"""The main job, end to end, on the embedded SQLite store and the local RabbitMQ.

Starts ``transform-worker run`` as a child process, loads ``examples/workflows/invoice.yaml``,
submits every GOBL envelope of the shared data folder as a job, and prints one line per
job: id, status, document code, digest check and signature check. Exits 0 when every
invoice was numbered and signed, every other document was refused by the workflow's
schema check, and every command got its reply.

Usage: ``scripts/demo [--data DIR] [--concurrency N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import uuid6

from contracts import Job
from contracts.client import JobRejected, JobsClient
from worker.gobl.envelope import verify_digest
from worker.gobl.signing import SignatureInvalid, verify_signature

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "gobl"
DEMO_DIR = ROOT / "data" / "demo"
AMQP_URL = os.environ.get("TRANSFORM_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


@dataclass
class Outcome:
    file: str
    is_invoice: bool
    job: Job | None = None
    error: str | None = None
    digest_ok: bool = False
    signature_ok: bool = False


def worker_env(namespace: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "TRANSFORM_STORE_URL": f"sqlite:///{DEMO_DIR / 'transform.db'}",
            "TRANSFORM_DATA_DIR": str(DEMO_DIR),
            "TRANSFORM_AMQP_NAMESPACE": namespace,
            "TRANSFORM_AMQP_URL": AMQP_URL,
            "TRANSFORM_LOG_FORMAT": "json",
            # Any free port, so that the demo never clashes with a worker already running.
            "TRANSFORM_METRICS_HOST": "127.0.0.1",
            "TRANSFORM_METRICS_PORT": "0",
        }
    )
    return env


def start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    subprocess.run(
        [sys.executable, "-m", "worker.cli", "workflows", "put", "examples/workflows/invoice.yaml"],
        cwd=ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "run"],
        cwd=ROOT,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the worker exited with {process.returncode}; see {log_path}")
        if b'"worker.started"' in log_path.read_bytes():
            return process
        time.sleep(0.1)
    process.kill()
    raise SystemExit(f"the worker did not start within 30 s; see {log_path}")


async def submit_all(files: list[Path], namespace: str, concurrency: int) -> list[Outcome]:
    gate = asyncio.Semaphore(concurrency)
    envelopes = {path: json.loads(path.read_text(encoding="utf-8")) for path in files}
    async with JobsClient(AMQP_URL, namespace=namespace, timeout_s=120) as client:

        async def one(path: Path) -> Outcome:
            envelope = envelopes[path]
            schema = str(envelope.get("doc", {}).get("$schema", ""))
            outcome = Outcome(path.name, is_invoice=schema.endswith("bill/invoice"))
            async with gate:
                try:
                    outcome.job = await client.create_job(
                        {"id": str(uuid6.uuid7()), "workflow_id": "invoice", "data": envelope},
                        wait=60,
                    )
                except JobRejected as exc:
                    outcome.error = f"rejected {exc.status}: {exc.error.message}"
            return outcome

        return await asyncio.gather(*(one(path) for path in files))


async def delete_topology(namespace: str) -> None:
    """Remove the run's exchanges and queues from the broker."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for queue in ("jobs", "dead"):
            await channel.queue_delete(f"{namespace}.{queue}")
        for exchange in ("commands", "unrouted", "events", "dead"):
            await channel.exchange_delete(f"{namespace}.{exchange}")


def check(outcome: Outcome, public_jwk: dict[str, Any] | None) -> None:
    job = outcome.job
    if job is None or job.envelope is None:
        return
    outcome.digest_ok = verify_digest(job.envelope)
    sigs = job.envelope.get("sigs") or []
    if sigs and public_jwk is not None:
        try:
            payload = verify_signature(sigs[0], public_jwk)
            outcome.signature_ok = payload.get("dig") == job.envelope["head"]["dig"]
        except SignatureInvalid:
            outcome.signature_ok = False


def line(outcome: Outcome) -> str:
    job = outcome.job
    if job is None:
        return f"{'-':36}  {'ERROR':8} {outcome.file}: {outcome.error}"
    code = (job.envelope or {}).get("doc", {}).get("code", "-") if job.envelope else "-"
    state = "completed" if job.completed_at and not job.faults else "failed"
    if job.completed_at is None:
        state = "pending"
    fault = f"  fault={job.faults[0].code}" if job.faults else ""
    digest = "ok" if outcome.digest_ok else "--"
    signature = "ok" if outcome.signature_ok else "--"
    return (
        f"{job.id}  {state:9} status={job.status!s:7} code={code:10} digest={digest} "
        f"signature={signature}  {outcome.file}{fault}"
    )


def summarise(outcomes: list[Outcome], elapsed_s: float) -> bool:
    invoices = [o for o in outcomes if o.is_invoice]
    others = [o for o in outcomes if not o.is_invoice]
    signed = [
        o
        for o in invoices
        if o.job and o.job.completed_at and not o.job.faults and o.digest_ok and o.signature_ok
    ]
    refused = [
        o for o in others if o.job and o.job.faults and o.job.faults[0].code == "schema-mismatch"
    ]
    codes = sorted((o.job.envelope or {})["doc"]["code"] for o in signed if o.job)
    unanswered = [o for o in outcomes if o.job is None and o.error is None]
    print()
    print(
        f"{len(outcomes)} jobs in {elapsed_s:.1f} s: {len(signed)}/{len(invoices)} invoices "
        f"numbered and signed ({codes[0] if codes else '-'} … {codes[-1] if codes else '-'}), "
        f"digests and signatures verified; {len(refused)}/{len(others)} other documents "
        f"failed the workflow's schema check as designed (rescue set them to error); "
        f"{len(unanswered)} without a reply."
    )
    distinct = len(set(codes)) == len(codes)
    return len(signed) == len(invoices) and len(refused) == len(others) and distinct


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of envelopes")
    parser.add_argument("--concurrency", type=int, default=16, help="commands in flight")
    args = parser.parse_args()
    files = sorted(args.data.glob("*.json"))
    if not files:
        print(f"no envelopes in {args.data}", file=sys.stderr)
        return 1

    # A fresh database and namespace per run, so that runs never see each other's jobs.
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    for stale in DEMO_DIR.glob("transform.db*"):
        stale.unlink()
    namespace = f"demo-{uuid6.uuid7().hex[-12:]}"
    env = worker_env(namespace)
    log_path = DEMO_DIR / "worker.log"
    print(f"worker: sqlite {DEMO_DIR / 'transform.db'}, exchanges {namespace}.*, log {log_path}")
    process = start_worker(env, log_path)
    try:
        started = time.monotonic()
        outcomes = asyncio.run(submit_all(files, namespace, args.concurrency))
        elapsed = time.monotonic() - started
    finally:
        process.send_signal(signal.SIGTERM)
        exit_code = process.wait(timeout=60)
        asyncio.run(delete_topology(namespace))

    public_jwk = None
    key_file = DEMO_DIR / "signing-key.jwk.json"
    if key_file.exists():
        private = json.loads(key_file.read_text())
        public_jwk = {k: private[k] for k in ("kty", "crv", "x", "y", "kid") if k in private}
    for outcome in outcomes:
        check(outcome, public_jwk)
        print(line(outcome))
    ok = summarise(outcomes, elapsed)
    print(f"worker stopped on SIGTERM with exit code {exit_code}")
    return 0 if ok and exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
