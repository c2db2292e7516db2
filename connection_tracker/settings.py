"""The one typed settings object. Each command builds it in main() from the environment
(prefix CONNTRACK_) and its flags, then passes it down; nothing reads the environment elsewhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONNTRACK_", extra="ignore", frozen=True)

    kafka_bootstrap_servers: str = Field(
        "127.0.0.1:19092", description="Kafka bootstrap servers, comma separated."
    )
    events_topic: str = Field("conntrack.events.v1", description="Topic gateways publish to.")
    dead_letter_topic: str = Field(
        "conntrack.events.v1.dlq", description="Where undecodable or invalid events go."
    )
    consumer_group: str = Field("conntrack-projector", description="Projector consumer group.")
    database_url: str = Field(
        "sqlite+aiosqlite:///.local/readmodel.db",
        description="SQLAlchemy async URL of the read model.",
    )
    api_listen: str = Field("127.0.0.1:50051", description="host:port the gRPC API listens on.")
    # The API (docs/api.md, "Configuration" explains each one).
    api_grace_seconds: float = Field(10.0, ge=0)
    api_health_interval_seconds: float = Field(2.0, gt=0)
    api_tls_cert_file: Path | None = None
    api_tls_key_file: Path | None = None
    api_tls_client_ca_file: Path | None = None
    api_tokens: SecretStr | None = None
    api_tokens_file: Path | None = None
    api_client_token: SecretStr | None = None
    api_max_message_bytes: int = Field(262_144, ge=1024)
    api_max_concurrent_calls: int = Field(64, ge=1)
    api_db_timeout_seconds: float = Field(5.0, gt=0)
    api_db_pool_size: int = Field(10, ge=1)
    api_freshness_ttl_ms: int = Field(1000, ge=0)
    # Get coalescing (api/batching.py): concurrent lookups share one query of at most
    # batch_max_ids ids; at most batch_max_in_flight such queries run at once, and under load
    # one starts at most every batch_window_ms (docs/api.md, "How a Get is answered").
    api_batch_max_ids: int = Field(256, ge=1)
    api_batch_max_in_flight: int = Field(1, ge=1)
    api_batch_window_ms: float = Field(3.0, ge=0, le=1000)
    metrics_port: int = Field(0, description="Prometheus metrics port; 0 disables the endpoint.")
    # The API's metrics endpoint binds here; unset: the host of api_listen.
    api_metrics_host: str | None = None
    log_level: str = Field("INFO", description="Python logging level.")
    # connection_tracker.lifecycle.tune_gc: container allocations between two young-generation
    # collections. Unset: each command's choice (50000 for batch work, Python's 700 for the
    # API); 0 keeps Python's defaults and skips gc.freeze.
    gc_gen0_threshold: int | None = Field(None, ge=0)

    # Projector batching: a batch closes at batch_max_events or after batch_max_wait_ms.
    # Large batches only form while records wait; each batch pays a commit and other fixed costs
    # (20000 measured ~1.8x the rate of 5000: docs/projector.md, "Batching and performance").
    batch_max_events: int = Field(20000, ge=1)
    batch_max_wait_ms: int = Field(100, ge=1)

    # Projector retention (docs/projector.md, "Retention"): rows of connections disconnected
    # longer ago than this are pruned from the read model (0 keeps them forever); a tombstone
    # keeps a late duplicate event from resurrecting them, for retention_tombstone_seconds
    # after the disconnect (0: forever).
    retention_disconnected_seconds: int = Field(0, ge=0)
    retention_tombstone_seconds: int = Field(0, ge=0)
    retention_interval_seconds: float = Field(60.0, gt=0)
    # Longest pause between retries while the database or broker is unavailable.
    retry_max_backoff_seconds: float = Field(10.0, gt=0)
    # How long the group waits for a silent projector (crashed, partitioned) before giving its
    # partitions to the others; the broker bounds it (group.min/max.session.timeout.ms).
    consumer_session_timeout_ms: int = Field(10000, ge=1000)


def settings_from(**flags: Any) -> Settings:
    """Settings from the environment with the command-line flags that were given on top (a flag
    left at None was not given and does not override anything)."""
    return Settings(**{name: value for name, value in flags.items() if value is not None})
