"""``webhook``: POST a summary of the job to a URL on the allow-list.

The body is ``{id, event, job_id, silo_entry_id, workspace_id, key, meta, faults}``.
``id`` is derived from the job and step ids, so every retry of one step sends the same
``id`` and a receiver can drop repeats. A 2xx response is OK; 5xx, 429, timeouts and
network errors are transient (retried, honouring ``Retry-After``); any other status is
KO with the status as code. Redirects are not followed: a 3xx is KO too, because
following it could leave the allow-list. User info in the URL is sent as Basic
credentials unless a ``token`` is configured, which is sent as a bearer token instead.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Annotated, Any
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from worker.actions.base import ActionResult, ActionSpec, StepContext, ko, ok
from worker.errors import TransientError

#: Longest ``Retry-After`` honoured; a longer one falls back to the retry schedule.
MAX_RETRY_AFTER_S = 3600.0


class WebhookConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str
    headers: dict[str, str] = Field(default_factory=dict)
    token: SecretStr | None = Field(default=None, description="Sent as a bearer token")
    event: Annotated[str, Field(min_length=1, max_length=100)] = "job.webhook"
    timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("url must be an absolute http:// or https:// URL")
        return value


def redact_url(url: str) -> str:
    """Return the URL without credentials, query or fragment, for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


def host_allowed(url: str, allowed: frozenset[str]) -> bool:
    """Return whether the URL's host (or ``host:port``) is on the allow-list, ignoring case."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    with_port = f"{host}:{parts.port}" if parts.port else host
    return host in allowed or with_port in allowed


def delivery_id(job_id: str, step_id: str) -> str:
    """Return the stable id of one step's webhook: the same for every retry."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"transform-worker:{job_id}/{step_id}"))


async def post(ctx: StepContext[WebhookConfig]) -> ActionResult:
    """POST the job summary and map the response to a step result."""
    config = ctx.config
    target = redact_url(config.url)
    if not host_allowed(config.url, ctx.services.webhook_allow_hosts):
        return ko(
            "host-not-allowed",
            f"{urlsplit(config.url).hostname} is not in TRANSFORM_WEBHOOK_ALLOW_HOSTS",
        )
    client = ctx.services.http
    if client is None:
        raise TransientError("no HTTP client is configured for webhooks")
    body = {
        "id": delivery_id(ctx.job_id, ctx.step_id),
        "event": config.event,
        "job_id": ctx.job_id,
        "silo_entry_id": ctx.entry_id,
        "workspace_id": ctx.workspace_id,
        "key": ctx.key,
        "meta": dict(ctx.meta),
        "faults": list(ctx.faults),
    }
    headers = dict(config.headers)
    url = config.url
    if config.token is not None:
        # User info in the URL would become Basic credentials; the token wins over it.
        headers["Authorization"] = f"Bearer {config.token.get_secret_value()}"
        url = str(httpx.URL(url).copy_with(username=None, password=None))
    try:
        response = await client.post(url, json=body, headers=headers, timeout=config.timeout_s)
    except httpx.TimeoutException as exc:
        raise TransientError(f"POST {target} timed out after {config.timeout_s:g} s") from exc
    except httpx.HTTPError as exc:
        raise TransientError(f"POST {target} failed: {type(exc).__name__}") from exc
    return _outcome(response, target)


def _outcome(response: Any, target: str) -> ActionResult:
    status = int(response.status_code)
    if 200 <= status < 300:
        return ok(f"POST {target}: {status}")
    if status == 429 or status >= 500:
        raise TransientError(
            f"POST {target}: {status}", retry_in_s=_retry_after(response.headers.get("retry-after"))
        )
    return ko(str(status), f"POST {target}: {status}")


def _retry_after(value: str | None) -> float | None:
    """Parse ``Retry-After`` (seconds or an HTTP date) into seconds from now."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        seconds = (moment - datetime.now(UTC)).total_seconds()
    if seconds < 0:
        return 0.0
    return seconds if seconds <= MAX_RETRY_AFTER_S else None


ACTIONS = [ActionSpec("webhook", post, WebhookConfig, "POST the job summary to a URL")]
