"""The durable retry schedule of a step that keeps failing transiently."""

from __future__ import annotations

from worker.settings import Settings


def retry_delay_s(attempt: int, settings: Settings) -> float:
    """Return the delay before rescheduled attempt number ``attempt`` (1-based).

    The delay starts at ``retry_first_s`` and doubles while it stays within
    ``retry_doubling_max_s`` (5 s, 10 s, … 1,280 s by default); after that it is
    ``retry_steady_s`` (30 minutes by default).
    """
    delay = settings.retry_first_s
    for _ in range(attempt - 1):
        if delay * 2 > settings.retry_doubling_max_s:
            return settings.retry_steady_s
        delay *= 2
    return delay
