"""Starting and stopping the processes under test, and measuring their CPU time and memory."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

#: Substrings of log lines that report a problem, in the worker's and Celery's formats.
PROBLEM_MARKERS = (
    '"level": "warning"',
    '"level": "error"',
    '"level": "critical"',
    "WARNING/",
    "ERROR/",
    "CRITICAL/",
    "Traceback",
)

#: Interval between two memory samples, in seconds.
SAMPLE_INTERVAL_S = 0.05


@dataclass
class Service:
    """One started process of a system under test, with the log its output goes to."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def problem_lines(self) -> list[str]:
        """Return the log lines that report a warning, an error or a traceback.

        Matches the worker's JSON lines (``"level": "warning"``) and Celery's text lines
        (``WARNING/MainProcess``).
        """
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return []
        return [
            line for line in text.splitlines() if any(marker in line for marker in PROBLEM_MARKERS)
        ]

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def start(
    name: str, command: Sequence[str], env: Mapping[str, str], cwd: Path, log_dir: Path
) -> Service:
    """Start ``command`` in its own session, with stdout and stderr going to a log file."""
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            list(command),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Service(name, process, log_path)


def stop(services: Sequence[Service], timeout_s: float = 20.0) -> list[str]:
    """Stop services with SIGTERM, then SIGKILL after ``timeout_s``; return what had to be killed.

    Processes the services started themselves (Celery's pool processes) are killed too
    when they outlive their parent.
    """
    descendants: list[psutil.Process] = []
    for service in services:
        with contextlib.suppress(psutil.Error):
            descendants += psutil.Process(service.process.pid).children(recursive=True)
        if service.process.poll() is None:
            service.process.send_signal(signal.SIGTERM)

    killed = []
    deadline = time.monotonic() + timeout_s
    for service in services:
        try:
            service.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            service.process.kill()
            service.process.wait()
            killed.append(service.name)

    _, alive = psutil.wait_procs(descendants, timeout=max(0.1, deadline - time.monotonic()))
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
            killed.append(f"pid {process.pid} (child)")
    return killed


def check_running(services: Sequence[Service]) -> None:
    """Raise RuntimeError with the log tail of the first service that has exited."""
    for service in services:
        code = service.process.poll()
        if code is not None:
            raise RuntimeError(
                f"{service.name} exited with status {code}; last lines of {service.log_path}:\n"
                f"{service.log_tail()}"
            )


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def cpu_seconds(services: Sequence[Service]) -> float:
    """Return the user plus system CPU time of the services and their live child processes.

    A child that has already exited is missing from the sum unless its parent waited
    for it; Celery's pool processes and the worker's threads live for the whole run.
    """
    total = 0.0
    for service in services:
        for process in _tree(service.process.pid):
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                total += times.user + times.system
    return total


class Monitor:
    """Measures CPU seconds and peak RSS of the services between ``start`` and ``stop``.

    RSS is sampled every ``SAMPLE_INTERVAL_S`` in a thread. A service's RSS is the sum
    over its process tree (for Celery, the main process plus its pool process), so a
    short peak between two samples can be missed.
    """

    def __init__(self, services: Sequence[Service]) -> None:
        self.services = list(services)
        self.peak_rss_bytes = [0] * len(self.services)
        self.cpu_s = 0.0
        self._cpu_before = 0.0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._sample_loop, name="bench-monitor", daemon=True)

    def start(self) -> Monitor:
        self._cpu_before = cpu_seconds(self.services)
        self._thread.start()
        return self

    def stop(self) -> Monitor:
        self._stopping.set()
        self._thread.join()
        self._sample()
        self.cpu_s = cpu_seconds(self.services) - self._cpu_before
        return self

    @property
    def max_peak_rss_bytes(self) -> int:
        return max(self.peak_rss_bytes, default=0)

    def _sample_loop(self) -> None:
        while not self._stopping.wait(SAMPLE_INTERVAL_S):
            self._sample()

    def _sample(self) -> None:
        for position, service in enumerate(self.services):
            rss = 0
            with contextlib.suppress(psutil.Error):
                for process in _tree(service.process.pid):
                    with contextlib.suppress(psutil.Error):
                        rss += process.memory_info().rss
            self.peak_rss_bytes[position] = max(self.peak_rss_bytes[position], rss)


def machine_facts() -> dict[str, str]:
    """Return the CPU and memory facts printed with every result table."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "CPUs (logical)": str(psutil.cpu_count(logical=True)),
        "CPUs (physical)": str(psutil.cpu_count(logical=False)),
        "CPU model": model,
        "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
    }


def load_average() -> str:
    """Return the 1, 5 and 15 minute load averages, to show how busy the machine was."""
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())
