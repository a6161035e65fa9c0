"""Worker settings, read from ``TRANSFORM_*`` environment variables at the entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024


class Settings(BaseSettings):
    """Every tunable of the worker. Durations carry their unit in the name."""

    model_config = SettingsConfigDict(env_prefix="TRANSFORM_", extra="ignore")

    amqp_url: SecretStr = Field(
        default=SecretStr("amqp://guest:guest@127.0.0.1:5672/"),
        description="Broker URL; it contains credentials, so it is never logged",
    )
    amqp_namespace: str = Field(
        default="transform",
        pattern=r"^[A-Za-z0-9._-]+$",
        description="Prefix of every exchange and queue name (transform.commands, …)",
    )
    store_url: str = Field(
        default="sqlite:///./data/transform.db",
        description="sqlite:///path/to/file.db, or mongodb:// / mongodb+srv:// URL",
    )
    sqlite_synchronous: Literal["full", "normal"] = Field(
        default="full",
        description="full: every commit survives a power cut; normal: a process crash only",
    )
    sqlite_busy_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="How long SQLite waits for another process's write lock before a write "
        "fails and is retried",
    )
    data_dir: Path = Field(
        default=Path("./data"), description="Folder for the generated signing key"
    )
    prefetch: int = Field(default=32, ge=1, le=10_000, description="Maximum jobs running at once")
    max_message_bytes: int = Field(default=4 * MIB, ge=1024)
    delivery_limit: int = Field(
        default=20,
        ge=1,
        description="x-delivery-limit of the work queue; must match an existing queue. "
        "RabbitMQ counts a delivery returned by a closed channel too, so a low limit "
        "could dead-letter commands that sat in the prefetch buffer of crashed workers",
    )
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    workflows_dir: Path | None = None
    signing_key_file: Path | None = None
    metrics_host: str = Field(
        default="0.0.0.0", description="Address of the /metrics, /healthz and /readyz server"
    )
    metrics_port: int = Field(
        default=9100, ge=0, le=65535, description="Its port; 0 picks a free one (logged)"
    )
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    step_timeout_s: float = Field(
        default=300.0, gt=0, description="Timeout of a step that sets none"
    )
    publish_timeout_s: float = Field(
        default=10.0, gt=0, description="Maximum wait for a broker confirm"
    )
    lease_s: float = Field(
        default=30.0,
        gt=0,
        description="How long a runner owns a job without renewing; a crashed runner's "
        "jobs resume after this",
    )
    sweep_interval_s: float = Field(
        default=1.0, gt=0, description="How often the store is polled for due jobs and replies"
    )
    outbox_retry_s: float = Field(
        default=15.0,
        gt=0,
        description="Age after which an unpublished reply or event is published again",
    )
    workspace_users: str = Field(
        default="",
        description="Comma-separated user=workspace pairs. When set, every command must "
        "carry the AMQP user_id of a listed broker user and may only touch that user's "
        "workspace",
    )
    webhook_allow_hosts: str = Field(
        default="",
        description="Comma-separated hosts (or host:port) the webhook action may call; "
        "empty allows none",
    )
    workflow_cache_s: float = Field(
        default=1.0,
        ge=0,
        description="How long the current version of a workflow is cached; a job created "
        "this soon after a put may still run the version before",
    )
    key_ttl_days: int = Field(
        default=730, ge=1, description="How long a job key stays taken (2 years)"
    )

    retry_inline_attempts: int = Field(
        default=3, ge=1, description="Tries of a failing step before it is rescheduled"
    )
    retry_inline_initial_s: float = Field(default=0.2, ge=0)
    retry_inline_max_s: float = Field(default=2.0, ge=0)
    retry_first_s: float = Field(default=5.0, gt=0, description="First rescheduled delay")
    retry_doubling_max_s: float = Field(
        default=1280.0, gt=0, description="Delays double from retry_first_s up to this"
    )
    retry_steady_s: float = Field(default=1800.0, gt=0, description="Delay after doubling ends")
    retry_max_attempts: int = Field(
        default=100,
        ge=1,
        description="Rescheduled attempts of one step before it ends with KO, whatever "
        "delays the action asked for",
    )
    retry_total_s: float = Field(
        default=12 * 3600.0, gt=0, description="A step failing this long ends with KO"
    )

    @field_validator("workspace_users")
    @classmethod
    def _pairs(cls, value: str) -> str:
        for item in value.split(","):
            if item.strip() and "=" not in item:
                raise ValueError(f"{item.strip()!r} is not user=workspace")
        return value

    @field_validator("store_url")
    @classmethod
    def _known_store_scheme(cls, value: str) -> str:
        if not value.startswith(("sqlite:///", "mongodb://", "mongodb+srv://")):
            raise ValueError(
                "TRANSFORM_STORE_URL must start with sqlite:///, mongodb:// or mongodb+srv://"
            )
        return value

    @property
    def workspace_user_map(self) -> dict[str, str]:
        """The ``workspace_users`` pairs as a mapping from broker user to workspace."""
        pairs: dict[str, str] = {}
        for item in self.workspace_users.split(","):
            if not item.strip():
                continue
            user, separator, workspace = item.partition("=")
            if not separator or not user.strip() or not workspace.strip():
                raise ValueError(
                    f"TRANSFORM_WORKSPACE_USERS item {item.strip()!r} is not user=workspace"
                )
            pairs[user.strip()] = workspace.strip()
        return pairs

    @property
    def webhook_hosts(self) -> frozenset[str]:
        """The webhook allow-list, lower-cased."""
        return frozenset(
            host.strip().lower() for host in self.webhook_allow_hosts.split(",") if host.strip()
        )

    def exchange(self, suffix: str) -> str:
        """Return the name of one of the worker's exchanges or queues."""
        return f"{self.amqp_namespace}.{suffix}"
