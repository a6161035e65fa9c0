"""The ``transform-worker`` command line."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog
from aiormq.exceptions import AMQPError
from pydantic import ValidationError

from contracts.client import CommandNotRouted, JobRejected, JobsClient, ReplyTimeout
from contracts.schemas import DEFAULT_DIR, write_schemas
from worker.actions.registry import default_registry
from worker.errors import RejectedError, TransientError
from worker.logs import configure_logging
from worker.service import Worker
from worker.settings import Settings
from worker.store import create_store
from worker.workflows import dump_workflow, load_workflow_files, put_workflow

log = structlog.get_logger("worker.cli")

#: Exit status of ``submit`` and ``jobs show`` when the job finished with faults.
EXIT_FAILED = 3
#: Exit status when the job had not finished (a ``job.pending`` reply).
EXIT_PENDING = 4


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"invalid TRANSFORM_* setting: {exc}", file=sys.stderr)
        return 2
    handler = args.handler
    try:
        return int(handler(args, settings))
    except RejectedError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
    except json.JSONDecodeError as exc:
        print(f"error: the file is not valid JSON: {exc}", file=sys.stderr)
    except OSError as exc:
        # Unreadable files, and a broker or store that cannot be reached.
        print(f"error: {exc}", file=sys.stderr)
    except ValidationError as exc:
        print(f"error: invalid argument: {_first_problem(exc)}", file=sys.stderr)
    except (AMQPError, TransientError, CommandNotRouted) as exc:
        print(f"error: {exc}", file=sys.stderr)
    return 1


def _first_problem(exc: ValidationError) -> str:
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transform-worker",
        description="Runs GOBL document workflows from RabbitMQ commands. "
        "Settings come from TRANSFORM_* environment variables.",
        epilog="submit and jobs show exit with 0 when the job completed, 1 when the command "
        f"was rejected or no reply came, {EXIT_FAILED} when the job failed and "
        f"{EXIT_PENDING} when it is still running. Every command exits with 1 on an error "
        "and 2 on invalid usage.",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="consume commands and run jobs until SIGTERM")
    run.set_defaults(handler=_run)

    submit = commands.add_parser("submit", help="publish a create-job command and print the reply")
    submit.add_argument("file", type=Path, help="a GOBL envelope or document, or a job.create body")
    submit.add_argument("--workflow", help="workflow id (required unless FILE is a command)")
    submit.add_argument("--workspace", default=None, help="workspace id (default: default)")
    submit.add_argument("--key", help="idempotency key")
    submit.add_argument("--wait", type=int, help="seconds to wait before a job.pending reply")
    submit.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for the reply (default 60)"
    )
    submit.set_defaults(handler=_submit)

    jobs = commands.add_parser("jobs", help="inspect jobs").add_subparsers(
        required=True, metavar="ACTION"
    )
    show = jobs.add_parser("show", help="print a job, by id or by key")
    show.add_argument("id", nargs="?", help="job id")
    show.add_argument("--key", help="find the job by its idempotency key instead")
    show.add_argument(
        "--workspace", help="workspace id (default: default, or the broker user's workspace)"
    )
    show.set_defaults(handler=_show)

    attachment = jobs.add_parser("attachment", help="write one of a job's attachments to a file")
    attachment.add_argument("id", help="job id")
    attachment.add_argument("key", help="attachment key, such as pdf")
    attachment.add_argument("-o", "--output", type=Path, required=True, help="file to write")
    attachment.add_argument("--workspace", default="default")
    attachment.set_defaults(handler=_attachment)

    workflows = commands.add_parser("workflows", help="manage workflows").add_subparsers(
        required=True, metavar="ACTION"
    )
    put = workflows.add_parser("put", help="check and store workflow files (JSON or YAML)")
    put.add_argument("files", type=Path, nargs="+")
    put.set_defaults(handler=_put)
    listing = workflows.add_parser("list", help="print the current version of every workflow")
    listing.add_argument("--workspace", default="default")
    listing.set_defaults(handler=_list)

    schemas = commands.add_parser("schemas", help="write the JSON Schema files of the contracts")
    schemas.add_argument("directory", type=Path, nargs="?", default=DEFAULT_DIR)
    schemas.set_defaults(handler=_schemas)
    return parser


# Commands


def _run(args: argparse.Namespace, settings: Settings) -> int:
    configure_logging(settings.log_format, settings.log_level)
    return asyncio.run(_serve(settings))


async def _serve(settings: Settings) -> int:
    worker = Worker(settings)
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        # The second signal skips the grace period; jobs are released, not lost.
        log.info("worker.signal", signal=signal.Signals(signum).name, count=signals_seen)
        worker.request_stop(immediate=signals_seen > 1)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    freezer = asyncio.create_task(_freeze_heap_once_started(worker))
    try:
        await worker.run()
    except Exception:
        log.exception("worker.failed")
        return 1
    finally:
        freezer.cancel()
    return 0


async def _freeze_heap_once_started(worker: Worker) -> None:
    """Move everything alive at start out of the garbage collector's sight.

    Modules, settings, the registry and the connections live as long as the process.
    Left in the collector's oldest generation, they are walked by every full
    collection, which paused the event loop for tens of milliseconds and set the
    slowest replies in the benchmark.
    """
    await worker.started.wait()
    gc.collect()
    gc.freeze()


def _submit(args: argparse.Namespace, settings: Settings) -> int:
    payload = json.loads(args.file.read_text(encoding="utf-8"))
    if isinstance(payload, dict) and "$schema" in payload:
        if not args.workflow:
            print("error: --workflow is required when FILE is a document", file=sys.stderr)
            return 2
        command: dict[str, Any] = {"workflow_id": args.workflow, "data": payload}
    elif isinstance(payload, dict):
        command = payload
        if args.workflow:
            command["workflow_id"] = args.workflow
    else:
        print("error: FILE must hold a JSON object", file=sys.stderr)
        return 2
    if args.workspace:
        command["workspace_id"] = args.workspace
    if args.key:
        command["key"] = args.key

    async def submit() -> Any:
        async with _client(settings, args.timeout) as client:
            return await client.create_job(command, wait=args.wait)

    return _print_reply(submit)


def _show(args: argparse.Namespace, settings: Settings) -> int:
    if args.id is None and args.key is None:
        print("error: give a job id or --key KEY", file=sys.stderr)
        return 2
    if args.id is not None and args.key is not None:
        print("error: give a job id or --key KEY, not both", file=sys.stderr)
        return 2

    async def show() -> Any:
        async with _client(settings, 10.0) as client:
            return await client.get_job(id=args.id, key=args.key, workspace_id=args.workspace)

    return _print_reply(show)


def _attachment(args: argparse.Namespace, settings: Settings) -> int:
    async def fetch() -> str | None:
        store = create_store(settings)
        await store.open()
        try:
            job = await store.get_job(args.id)
            if job is None or job.workspace_id != args.workspace:
                return f"no job {args.id} in workspace {args.workspace}"
            found = [a for a in job.attachments if a.key == args.key]
            if not found:
                keys = ", ".join(a.key for a in job.attachments) or "none"
                return f"job {args.id} has no attachment {args.key!r}; it has: {keys}"
            stored = await store.get_file(job.workspace_id, found[-1].id)
            if stored is None:
                return f"the bytes of attachment {found[-1].id} are missing from the store"
            args.output.write_bytes(stored.data)
            print(f"{args.output} ({len(stored.data)} bytes, {found[-1].mime})")
            return None
        finally:
            await store.close()

    problem = asyncio.run(fetch())
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    return 0


def _put(args: argparse.Namespace, settings: Settings) -> int:
    workflows = load_workflow_files(args.files)
    registry = default_registry()

    async def put() -> None:
        store = create_store(settings)
        await store.open()
        try:
            for workflow in workflows:
                record = await put_workflow(store, registry, workflow)
                print(f"{workflow.workspace_id}/{workflow.id} version {record.version}")
        finally:
            await store.close()

    asyncio.run(put())
    return 0


def _list(args: argparse.Namespace, settings: Settings) -> int:
    async def listing() -> None:
        store = create_store(settings)
        await store.open()
        try:
            for record in await store.list_workflows(args.workspace):
                print(f"{record.version}\t{dump_workflow(record.workflow)}")
        finally:
            await store.close()

    asyncio.run(listing())
    return 0


def _schemas(args: argparse.Namespace, settings: Settings) -> int:
    for path in write_schemas(args.directory):
        print(path)
    return 0


# Helpers


def _client(settings: Settings, timeout_s: float) -> JobsClient:
    return JobsClient(
        settings.amqp_url.get_secret_value(),
        namespace=settings.amqp_namespace,
        timeout_s=timeout_s,
        connection_name="transform-worker cli",
    )


def _print_reply(call: Any) -> int:
    try:
        job = asyncio.run(call())
    except JobRejected as exc:
        print(exc.error.model_dump_json(indent=2))
        print(f"rejected: {exc.status} {exc.error.key}", file=sys.stderr)
        return 1
    except ReplyTimeout as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(job.model_dump_json(indent=2))
    if job.completed_at is None:
        return EXIT_PENDING
    return EXIT_FAILED if job.faults else 0


if __name__ == "__main__":
    sys.exit(main())
