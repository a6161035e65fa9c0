"""Structured logging: one JSON object per line on stdout, or a console layout for people.

Level policy: debug for message settlement and broker internals, info for lifecycle,
accepted and finished jobs and expected rejections, and warning for retries, lost
connections, dead letters and undeliverable replies. Error is only for unexpected
failures, with the traceback logged once where they are handled. Document contents and
credentials are never logged.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog

LogFormat = Literal["json", "console"]

#: Libraries whose own log lines are kept, at this level or above.
LIBRARY_LEVELS = {
    "aio_pika": logging.WARNING,
    "aiormq": logging.WARNING,
    "pymongo": logging.WARNING,
    # httpx logs every request's full URL at INFO, user info and query included, and
    # webhook URLs can carry credentials there.
    "httpx": logging.WARNING,
    "httpcore": logging.WARNING,
}


def configure_logging(
    log_format: LogFormat = "json",
    level: str = "info",
    *,
    stream: TextIO | None = None,
    cache_loggers: bool = True,
) -> None:
    """Route structlog and the standard library's logging to ``stream`` in one format.

    ``stream`` defaults to stdout. Tests pass their own stream and ``cache_loggers=False``
    so that no logger keeps writing to it after they reset the configuration.
    """
    output = stream if stream is not None else sys.stdout
    numeric = logging.getLevelNamesMapping()[level.upper()]
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    if log_format == "console":
        renderer = structlog.dev.ConsoleRenderer()
    else:
        # Tracebacks without local variables: locals can hold document contents.
        shared.append(
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        )
        renderer = structlog.processors.JSONRenderer()

    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(output),
        cache_logger_on_first_use=cache_loggers,
    )

    handler = logging.StreamHandler(output)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for name, library_level in LIBRARY_LEVELS.items():
        logging.getLogger(name).setLevel(max(library_level, numeric))
