"""Errors raised by the worker.

The tree::

    TransformError
    ├── RejectedError            the caller sent something we cannot accept; maps to a
    │   │                        ``job.rejected`` reply with an HTTP-like status
    │   ├── InvalidCommand       400 validation / invalid_json
    │   ├── UnsupportedMedia     415 unsupported_media_type
    │   ├── TooLarge             413 too_large
    │   ├── NotFound             404 not_found
    │   ├── Forbidden            403 forbidden (another workspace, or an unmapped user)
    │   ├── Conflict             409 conflict
    │   └── Unprocessable        422 validation (well-formed but unusable input)
    │       └── DigestMismatch   a signed envelope whose digest does not match its doc
    ├── TransientError           may pass by itself; the operation is retried
    │   └── StoreUnavailable     the database did not answer or refused the write
    └── FencedOut                a newer runner owns the job; stop without writing

Library errors are translated into these at the boundary with ``raise … from exc``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

#: Maximum length of an error message, in characters. Messages can quote what the caller
#: sent, and they travel in AMQP headers, whose frames the broker caps at 128 KiB.
MAX_MESSAGE_CHARS = 1000
#: Maximum length of a field path in a fault, in characters.
MAX_PATH_CHARS = 200


def clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Return ``text`` cut to ``limit`` characters, marking the cut with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class FaultDetail:
    """One problem inside a rejected command, pointing at the offending fields."""

    code: str
    message: str
    paths: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "code", clip(self.code, MAX_PATH_CHARS))
        object.__setattr__(self, "message", clip(self.message))
        object.__setattr__(self, "paths", tuple(clip(p, MAX_PATH_CHARS) for p in self.paths))


class TransformError(Exception):
    """Root of every error the worker raises on purpose."""


class RejectedError(TransformError):
    """The command cannot be accepted; the caller gets a ``job.rejected`` reply."""

    status: int = 400
    key: str = "validation"

    def __init__(
        self,
        message: str,
        *,
        faults: Sequence[FaultDetail] = (),
        job_id: str | None = None,
    ) -> None:
        message = clip(message)
        super().__init__(message)
        self.message = message
        # A hundred faults describe one bad command as well as a thousand would.
        self.faults = tuple(faults)[:100]
        self.job_id = job_id


class InvalidCommand(RejectedError):
    status = 400
    key = "validation"


class InvalidJson(InvalidCommand):
    key = "invalid_json"


class UnsupportedMedia(RejectedError):
    status = 415
    key = "unsupported_media_type"


class TooLarge(RejectedError):
    status = 413
    key = "too_large"


class NotFound(RejectedError):
    status = 404
    key = "not_found"


class Forbidden(RejectedError):
    status = 403
    key = "forbidden"


class Conflict(RejectedError):
    status = 409
    key = "conflict"


class Unprocessable(RejectedError):
    status = 422
    key = "validation"


class DigestMismatch(Unprocessable):
    """A signed envelope's ``head.dig`` is not the digest of its ``doc``."""


class TransientError(TransformError):
    """A failure that may pass by itself.

    Args:
        message: what failed, for logs and the intent's event.
        retry_in_s: when the raiser has the right delay (an HTTP ``Retry-After``,
            say), the next attempt waits this long instead of following the schedule.
    """

    def __init__(self, message: str, *, retry_in_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_in_s = retry_in_s


class StoreUnavailable(TransientError):
    """The store failed to read or write; nothing was acknowledged."""


class FencedOut(TransformError):
    """Another runner claimed the job after us, so our writes must stop."""

    def __init__(self, job_id: str, fence: int) -> None:
        super().__init__(f"job {job_id} was claimed by a newer runner; fence {fence} is stale")
        self.job_id = job_id
        self.fence = fence
