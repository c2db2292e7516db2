"""The one typed settings object. Each command builds it in main() from the environment
(prefix CONNTRACK_) and its flags, then passes it down; nothing reads the environment elsewhere."""

from __future__ import annotations

from pydantic import Field
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
        description="SQLAlchemy async URL of the read model (sqlite+aiosqlite or postgresql+asyncpg).",
    )
    api_listen: str = Field("127.0.0.1:50051", description="host:port the gRPC API listens on.")
    metrics_port: int = Field(0, description="Prometheus metrics port; 0 disables the endpoint.")
    log_level: str = Field("INFO", description="Python logging level.")

    # Projector batching: a batch closes at batch_max_events or after batch_max_wait_ms.
    batch_max_events: int = Field(5000, ge=1)
    batch_max_wait_ms: int = Field(100, ge=1)
