"""Measure the bare limit, transform-worker and Celery side by side, and write RESULTS.md.

Usage: ``python bench/run.py [--jobs N] [--window W] [--quick]``

Each system runs with 1 and then 2 worker processes. The bench measures its saturated
rate (``--window`` messages in flight over ``--jobs`` jobs) and its p50 and p99 latency
at half that rate (open loop over half as many jobs). It also measures the CPU time per
job of the system's own processes and their peak RSS. For transform-worker it keeps
1,000 jobs in flight too, to show the peak RSS under a deep backlog. bench/README.md
explains each number.

Everything a run creates is removed at its end: processes get SIGTERM (then SIGKILL),
queues and exchanges named with the run's prefix are deleted, and the temporary folder
goes away.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import processes
import systems
import uuid6
from load import LoadGenerator, RunResult
from processes import Monitor
from systems import SYSTEMS, System

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_DATA = systems.ROOT.parent / "shared" / "data" / "gobl"
DEFAULT_OUTPUT = systems.BENCH_DIR / "RESULTS.md"
#: Line in RESULTS.md after which the text is written by hand (the optimisation log).
#: A new run replaces what comes before the line and keeps the rest.
HANDWRITTEN_MARKER = "<!-- Written by hand below this line; bench/run.py keeps it. -->"

#: Jobs in flight for the deep-backlog run of transform-worker.
WIDE_WINDOW = 1000
#: Window of the unmeasured warm-up run that precedes the measurements.
WARMUP_WINDOW = 8
MIB = 2**20


@dataclass
class Row:
    """The measurements of one system with one number of worker processes."""

    system: str
    label: str
    processes: int
    saturated: RunResult | None = None
    paced: RunResult | None = None
    paced_rate_per_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss_bytes: int = 0
    wide: RunResult | None = None
    wide_peak_rss_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def rate_per_s(self) -> float:
        return self.saturated.rate_per_s if self.saturated else 0.0

    @property
    def cpu_ms_per_job(self) -> float:
        if self.saturated is None or self.saturated.succeeded == 0:
            return float("nan")
        return self.cpu_s / self.saturated.succeeded * 1000

    @property
    def problems(self) -> int:
        runs = [run for run in (self.saturated, self.paced, self.wide) if run is not None]
        return sum(run.failed + run.lost for run in runs)


async def measure(system: System, args: argparse.Namespace) -> Row:
    """Start the system, run the loads against it, and stop and remove it again."""
    row = Row(system.key, system.label, system.processes)
    try:
        await system.start()
        reply_queue = f"{system.namespace}.replies"
        async with LoadGenerator(args.url, reply_queue, system.target()) as load:
            index = 0
            warmup_jobs = min(50, args.jobs // 4)
            await load.run_window(warmup_jobs, WARMUP_WINDOW, first_index=index)
            index += warmup_jobs

            monitor = Monitor(system.services).start()
            row.saturated = await load.run_window(args.jobs, args.window, first_index=index)
            monitor.stop()
            index += args.jobs
            row.cpu_s = monitor.cpu_s
            row.peak_rss_bytes = monitor.max_peak_rss_bytes
            _note_failures(row, "saturated", row.saturated)

            if row.rate_per_s > 0:
                row.paced_rate_per_s = row.rate_per_s / 2
                monitor = Monitor(system.services).start()
                row.paced = await load.run_paced(
                    args.jobs // 2, row.paced_rate_per_s, first_index=index
                )
                monitor.stop()
                index += args.jobs // 2
                row.peak_rss_bytes = max(row.peak_rss_bytes, monitor.max_peak_rss_bytes)
                _note_failures(row, "paced", row.paced)
                if row.paced.max_start_lag_s > 0.010:
                    row.notes.append(
                        f"the paced generator fell up to {row.paced.max_start_lag_s * 1000:.0f} ms "
                        "behind schedule"
                    )

            if isinstance(system, systems.TransformWorker) and args.wide_window > 0:
                wide_jobs = max(args.jobs, args.wide_window)
                monitor = Monitor(system.services).start()
                row.wide = await load.run_window(wide_jobs, args.wide_window, first_index=index)
                monitor.stop()
                row.wide_peak_rss_bytes = monitor.max_peak_rss_bytes
                _note_failures(row, f"window {args.wide_window}", row.wide)
    except Exception as exc:
        row.notes.append(f"run aborted: {exc}")
    finally:
        # Read the logs before the stop, whose own log lines are not part of the measurement.
        for service in system.services:
            problems = service.problem_lines()
            if problems:
                row.notes.append(
                    f"{service.name} logged {len(problems)} warnings or errors; "
                    f"the first: {problems[0][:300]}"
                )
        killed = system.stop()
        if killed:
            row.notes.append(f"killed after the SIGTERM timeout: {', '.join(killed)}")
        names = system.names()
        names.queues.append(f"{system.namespace}.replies")
        for failure in await systems.delete_names(args.url, names):
            row.notes.append(f"could not delete {failure}")
    return row


def _note_failures(row: Row, run: str, result: RunResult) -> None:
    if result.failed or result.lost:
        row.notes.append(
            f"{run} run: {result.failed} failed and {result.lost} lost of {result.sent}"
            + (f"; first failure: {result.first_failure}" if result.first_failure else "")
        )


# Reporting


def _number(value: float, digits: int = 0) -> str:
    return "n/a" if value != value or value == 0 else f"{value:,.{digits}f}"  # NaN != NaN


def _processes(count: int) -> str:
    return "1 process" if count == 1 else f"{count} processes"


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}" if numerator > 0 and denominator > 0 else "n/a"


def render(rows: list[Row], args: argparse.Namespace, facts: dict[str, str]) -> str:
    """Return the results as Markdown: the run, the machine, the tables and the ratios."""
    lines = ["# Benchmark results", ""]
    if args.quick:
        lines += ["**Quick run**: few jobs, so the numbers are rough.", ""]
    lines += ["Written by `bench/run.py`; bench/README.md says what each column measures.", ""]
    lines += ["| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in facts.items()]
    lines += [""]

    lines += [
        f"## Throughput and latency ({args.jobs} jobs saturated, {args.jobs // 2} paced)",
        "",
        f"| system | processes | jobs/s (window {args.window}) | p50 ms | p99 ms "
        "| paced at jobs/s | CPU ms/job | peak RSS/worker MiB | failed or lost |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        paced = row.paced
        lines.append(
            f"| {row.label} | {row.processes} | {_number(row.rate_per_s)} "
            f"| {_number(paced.percentile_ms(0.50), 1) if paced else 'n/a'} "
            f"| {_number(paced.percentile_ms(0.99), 1) if paced else 'n/a'} "
            f"| {_number(row.paced_rate_per_s)} | {_number(row.cpu_ms_per_job, 2)} "
            f"| {_number(row.peak_rss_bytes / MIB, 1)} | {row.problems} |"
        )
    lines.append("")

    wide_rows = [row for row in rows if row.wide is not None]
    if wide_rows:
        lines += [
            f"## transform-worker with {args.wide_window} jobs in flight",
            "",
            "| processes | jobs | jobs/s | peak RSS/worker MiB | p99 ms |",
            "|---:|---:|---:|---:|---:|",
        ]
        for row in wide_rows:
            wide = row.wide
            assert wide is not None
            lines.append(
                f"| {row.processes} | {wide.sent} | {_number(wide.rate_per_s)} "
                f"| {_number(row.wide_peak_rss_bytes / MIB, 1)} "
                f"| {_number(wide.percentile_ms(0.99), 1)} |"
            )
        lines.append("")

    lines += [
        "## Ratios of saturated jobs/s",
        "",
        "| processes | transform-worker ÷ bare | transform-worker ÷ Celery |",
        "|---:|---:|---:|",
    ]
    by_key = {(row.system, row.processes): row for row in rows}
    for count in args.processes:
        worker = by_key.get((systems.TransformWorker.key, count))
        bare = by_key.get((systems.Bare.key, count))
        celery = by_key.get((systems.CeleryWorkers.key, count))
        worker_rate = worker.rate_per_s if worker else 0.0
        lines.append(
            f"| {count} | {_ratio(worker_rate, bare.rate_per_s if bare else 0.0)} "
            f"| {_ratio(worker_rate, celery.rate_per_s if celery else 0.0)} |"
        )
    lines.append("")

    notes = [
        f"- {row.label}, {_processes(row.processes)}: {note}" for row in rows for note in row.notes
    ]
    if notes:
        lines += ["## Notes", "", *notes, ""]
    return "\n".join(lines)


def collect_facts(argv: list[str], data: Path, envelopes: int) -> dict[str, str]:
    """Return the command line, date, versions and machine facts of this run."""
    try:
        rabbitmq = subprocess.run(
            ["rabbitmqctl", "version"], capture_output=True, text=True, timeout=60, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        rabbitmq = f"unknown ({exc})"
    facts = {
        "command": f"`{shlex.join(['python', 'bench/run.py', *argv])}`",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        **processes.machine_facts(),
        "load average at start (1, 5, 15 min)": processes.load_average(),
        "RabbitMQ": rabbitmq,
        "Python": platform.python_version(),
    }
    for package in ("aio-pika", "celery", "kombu", "SQLAlchemy", "psutil"):
        try:
            facts[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            facts[package] = "not installed"
    facts["input"] = f"{envelopes} GOBL invoice envelopes from {data.name}/, in turn"
    return facts


# Command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--jobs", type=int, help="jobs of each saturated run (default 2000, 300 with --quick)"
    )
    parser.add_argument(
        "--window", type=int, default=64, help="messages in flight when saturating (default 64)"
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run with 300 jobs")
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated systems to run (default {','.join(SYSTEMS)})",
    )
    parser.add_argument(
        "--processes", default="1,2", help="comma-separated worker process counts (default 1,2)"
    )
    parser.add_argument(
        "--wide-window",
        type=int,
        default=WIDE_WINDOW,
        help="jobs in flight of the transform-worker memory run, 0 to skip "
        f"(default {WIDE_WINDOW})",
    )
    parser.add_argument("--url", default=DEFAULT_URL, help="broker URL (default: local guest)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of GOBL envelopes")
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help="Markdown file to write the results to"
    )
    args = parser.parse_args(argv)

    if args.jobs is None:
        args.jobs = 300 if args.quick else 2000
    if args.jobs < 2 or args.window < 1:
        parser.error("--jobs must be at least 2 and --window at least 1")
    args.systems = [name.strip() for name in args.systems.split(",") if name.strip()]
    unknown = [name for name in args.systems if name not in SYSTEMS]
    if unknown:
        parser.error(f"unknown system {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    try:
        args.processes = [int(count) for count in args.processes.split(",")]
    except ValueError:
        parser.error(f"--processes must be comma-separated integers, not {args.processes!r}")
    if any(count < 1 for count in args.processes):
        parser.error("every --processes count must be at least 1")
    return args


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the cleanup below runs for both.
    signal.signal(signal.SIGTERM, _raise_interrupt)

    envelopes = systems.load_invoices(args.data)
    facts = collect_facts(argv, args.data, len(envelopes))
    prefix = f"bench-{uuid6.uuid7().hex[-12:]}"
    temporary = Path(tempfile.mkdtemp(prefix="transform-bench-"))
    print(f"run prefix {prefix}, temporary folder {temporary}", file=sys.stderr)

    rows: list[Row] = []
    started: list[System] = []
    interrupted = False
    try:
        for key in args.systems:
            for count in args.processes:
                namespace = f"{prefix}-{key.replace('-', '')}{count}"
                workdir = temporary / namespace
                workdir.mkdir()
                system = SYSTEMS[key](count, namespace, workdir, args.url, envelopes)
                started.append(system)
                print(f"measuring {system.label} with {_processes(count)} …", file=sys.stderr)
                rows.append(asyncio.run(measure(system, args)))
    except KeyboardInterrupt as exc:
        print(f"interrupted by {exc or 'SIGINT'}; cleaning up, no results written", file=sys.stderr)
        interrupted = True
    finally:
        for system in started:
            system.stop()
        leftovers = systems.broker_names(prefix)
        if leftovers.queues or leftovers.exchanges:
            print(f"deleting leftovers: {leftovers}", file=sys.stderr)
            asyncio.run(systems.delete_names(args.url, leftovers))
        shutil.rmtree(temporary, ignore_errors=True)

    if interrupted:
        return 130
    facts["load average at end (1, 5, 15 min)"] = processes.load_average()
    report = render(rows, args, facts)
    print(report)
    args.output.write_text(keep_handwritten(report, args.output), encoding="utf-8")
    print(f"written to {args.output}", file=sys.stderr)
    return 0 if rows and all(row.problems == 0 and row.rate_per_s > 0 for row in rows) else 1


def keep_handwritten(report: str, path: Path) -> str:
    """Return the new report followed by the hand-written part of the existing file."""
    kept = HANDWRITTEN_MARKER + "\n"
    if path.exists():
        existing = path.read_text(encoding="utf-8")
        if HANDWRITTEN_MARKER in existing:
            kept = existing[existing.index(HANDWRITTEN_MARKER) :]
    return report.rstrip() + "\n\n" + kept


if __name__ == "__main__":
    sys.exit(main())
