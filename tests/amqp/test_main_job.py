"""A create-job command becomes a numbered, signed envelope and one reply."""

from __future__ import annotations

from contracts import Status
from contracts.client import JobsClient
from tests.conftest import Captured, RunningWorker
from tests.factories import load_envelope
from worker.gobl.envelope import verify_digest
from worker.gobl.signing import verify_signature

INVOICE_WORKFLOW = {
    "id": "invoice",
    "schema": "bill/invoice",
    "steps": [
        {"id": "processing", "action": "silo.state", "config": {"state": "processing"}},
        {
            "id": "number",
            "action": "sequence.enumerate",
            "config": {"name": "inv", "prefix": "INV-", "padding": 4},
        },
        {"id": "sign", "action": "silo.close"},
        {"id": "sent", "action": "silo.state", "config": {"state": "sent"}},
    ],
}


async def test_invoice_is_numbered_and_signed(
    worker: RunningWorker, client: JobsClient, events: Captured
) -> None:
    await worker.put_workflow(INVOICE_WORKFLOW)

    job = await client.create_job({"workflow_id": "invoice", "data": load_envelope()}, wait=10)

    assert job.completed_at is not None
    assert job.faults == []
    assert job.status is Status.OK
    assert [intent.step_id for intent in job.intents] == ["processing", "number", "sign", "sent"]
    assert job.envelope is not None
    assert job.envelope["doc"]["code"] == "INV-0001"
    assert verify_digest(job.envelope)
    key = await worker.worker.engine.runner.services.signing_key()  # type: ignore[union-attr]
    payload = verify_signature(job.envelope["sigs"][0], key.public_jwk())
    assert payload["dig"] == job.envelope["head"]["dig"]
    completed = await events.wait_for(lambda m: m.type == "job.completed")
    assert completed.headers["x-job-id"] == job.id
    assert [m.type for m in events.messages] == ["job.accepted", "job.completed"]
