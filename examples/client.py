"""Submit an invoice to a running worker and print what came back."""

import asyncio
import json
import sys
from typing import Any

from contracts.client import JobRejected, JobsClient


async def submit(envelope: dict[str, Any], url: str, namespace: str = "transform") -> int:
    async with JobsClient(url, namespace=namespace) as client:
        try:
            job = await client.create_job({"workflow_id": "invoice", "data": envelope}, wait=30)
        except JobRejected as rejected:
            print(f"rejected ({rejected.status}): {rejected.error.message}")
            return 1
        if job.completed_at is None:
            print(f"job {job.id} is still running; ask later with get_job(id=...)")
            return 0
        again = await client.get_job(id=job.id)
        assert job.envelope is not None
        print(
            f"job {job.id}: {job.status}, code {job.envelope['doc']['code']}, "
            f"{len(job.envelope['sigs'])} signature(s), found again: {again.id == job.id}"
        )
        return 0


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as file:
        document = json.load(file)
    sys.exit(asyncio.run(submit(document, "amqp://guest:guest@127.0.0.1:5672/")))
