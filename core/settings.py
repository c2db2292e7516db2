"""The one typed settings object. Each command builds it in main() from the environment
(prefix CONNTRACK_) and its flags (core/cli.py: one flag per setting), then passes
it down; nothing reads the environment elsewhere, and no component has defaults of its own for
what is set here: each default is stated once, below.

SECTIONS groups the settings by the component that uses them; each command offers the flags
of the sections it needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from conntrack.core.database import postgres_connect_arguments

ENV_PREFIX = "CONNTRACK_"

# The async drivers the read model runs on (SQLAlchemy URL schemes).
DATABASE_SCHEMES = ("sqlite+aiosqlite", "postgresql+asyncpg")
# Read replicas are PostgreSQL streaming replicas (api_read_database_urls).
REPLICA_SCHEME = "postgresql+asyncpg"


def split_urls(urls: str) -> tuple[str, ...]:
    """A comma-separated list of URLs, in order, blanks around and between commas ignored."""
    return tuple(url.strip() for url in urls.split(",") if url.strip())


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # kafka
    kafka_bootstrap_servers: str = Field(
        "127.0.0.1:19092", description="Kafka bootstrap servers, comma separated."
    )
    # How every Kafka client connects (core/kafka.py; docs/operations.md, "Connecting to a
    # secured Kafka cluster").
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol."
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "PLAIN", description="Kafka SASL mechanism (SASL_* protocols)."
    )
    kafka_sasl_username: str | None = Field(None, description="Kafka SASL user name.")
    kafka_sasl_password: SecretStr | None = Field(None, description="Kafka SASL password.")
    kafka_sasl_password_file: Path | None = Field(
        None, description="File holding the Kafka SASL password (instead of the password)."
    )
    kafka_ssl_cafile: Path | None = Field(
        None, description="CA (PEM) the brokers' certificates chain to; unset: the system's CAs."
    )
    kafka_ssl_certfile: Path | None = Field(
        None, description="Client certificate (PEM) for brokers that ask for one."
    )
    kafka_ssl_keyfile: Path | None = Field(None, description="Client certificate's key (PEM).")
    kafka_ssl_key_password: SecretStr | None = Field(
        None, description="Password of the client certificate's key."
    )
    kafka_ssl_key_password_file: Path | None = Field(
        None, description="File holding kafka_ssl_key_password (instead of the password)."
    )
    kafka_client_id: str = Field(
        "conntrack",
        description=(
            "Kafka client id prefix; each of the command's clients adds its component "
            "(<prefix>-projector, <prefix>-api, <prefix>-gateway, ...)."
        ),
    )
    events_topic: str = Field("conntrack.events.v1", description="Topic gateways publish to.")
    dead_letter_topic: str = Field(
        "conntrack.events.v1.dlq", description="Where undecodable or invalid events go."
    )
    commands_topic: str = Field(
        "conntrack.commands.v1",
        description="Where the API sends Send and Disconnect to the gateway node (key: node).",
    )
    command_outcomes_topic: str = Field(
        "conntrack.command-outcomes.v1",
        description="Where gateway nodes report what became of each command.",
    )
    # Kafka's batching on the command channel (docs/api.md, "Send latency and the channel's
    # batching").
    # With Kafka's defaults (linger 0, fetches answered at the first byte) every command and
    # every outcome was a request of its own, and at 1,000 Sends/s those requests took the
    # machine's CPU: the tail grew to hundreds of ms. Waiting a few ms batches them.
    commands_linger_ms: int = Field(
        5,
        ge=0,
        description="How long the API's command producer and a node's outcome producer wait "
        "to batch records (Kafka linger.ms).",
    )
    commands_fetch_wait_ms: int = Field(
        10,
        ge=0,
        description="How long the broker may hold a node's fetch of commands and the API's "
        "fetch of outcomes to batch records (Kafka fetch.max.wait.ms).",
    )

    # database
    database_url: str = Field(
        "sqlite+aiosqlite:///.local/readmodel.db",
        description="SQLAlchemy async URL of the read model "
        "(sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DB). "
        "PostgreSQL URLs take libpq's sslmode, sslrootcert, sslcert, sslkey, sslpassword, "
        "application_name and connect_timeout as libpq means them (`?sslmode=require`, as "
        "managed services hand it out), and asyncpg's own ssl, target_session_attrs, "
        "command_timeout; any other parameter is refused.",
    )
    database_url_file: Path | None = Field(
        None,
        description="File holding database_url (its password out of the environment and the "
        "command line, as container platforms mount secrets).",
    )

    # projector
    consumer_group: str = Field("conntrack-projector", description="Projector consumer group.")
    # A batch closes at batch_max_events or after batch_max_wait_ms. Large batches only form
    # while records wait; each batch pays a commit and other fixed costs (docs/projector.md,
    # "Batching and performance").
    batch_max_events: int = Field(20000, ge=1, description="Projector: most events per batch.")
    batch_max_wait_ms: int = Field(
        100, ge=1, description="Projector: longest wait to fill a batch, milliseconds."
    )
    refused_batch_attempts: int = Field(
        3,
        ge=1,
        description="Projector: attempts of a batch the database refuses (a constraint, a value "
        "out of range) before the refused records are found and dead-lettered.",
    )
    retry_max_backoff_seconds: float = Field(
        10.0, gt=0, description="Longest pause between retries while a dependency is down."
    )
    # The broker bounds it (group.min/max.session.timeout.ms).
    consumer_session_timeout_ms: int = Field(
        10000,
        ge=1000,
        description="How long the group waits for a silent projector before giving its "
        "partitions to the others, milliseconds.",
    )

    # retention (docs/projector.md, "Retention"): a tombstone keeps a late duplicate event from
    # resurrecting a pruned connection.
    retention_disconnected_seconds: int = Field(
        0, ge=0, description="Prune connections disconnected longer ago than this; 0 keeps them."
    )
    retention_tombstone_seconds: int = Field(
        0, ge=0, description="Keep tombstones of pruned connections this long; 0: forever."
    )
    retention_interval_seconds: float = Field(
        60.0, gt=0, description="Seconds between two retention passes."
    )
    history_days: int = Field(
        7,
        ge=0,
        description="Days of presence history kept for answers in time (docs/history.md): "
        "connections pruned by retention move into it; 0 keeps none (pruned rows are deleted).",
    )

    # api (docs/api.md, "Configuration" explains each one)
    api_listen: str = Field("127.0.0.1:50051", description="host:port the gRPC API listens on.")
    api_rest_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Port of the REST mapping (HTTP/JSON, upstream's routes) on api_listen's "
        "host; 0: off.",
    )
    api_grace_seconds: float = Field(
        10.0, ge=0, description="On SIGTERM, how long in-flight calls may finish."
    )
    api_health_interval_seconds: float = Field(
        2.0, gt=0, description="Seconds between the health service's read-model probes."
    )
    api_tls_cert_file: Path | None = Field(None, description="TLS certificate chain (PEM).")
    api_tls_key_file: Path | None = Field(None, description="TLS private key (PEM).")
    api_tls_client_ca_file: Path | None = Field(
        None, description="CA (PEM) that client certificates must chain to (mutual TLS)."
    )
    api_tokens: SecretStr | None = Field(
        None, description="Accepted bearer tokens, comma separated."
    )
    api_tokens_file: Path | None = Field(None, description="File of accepted bearer tokens.")
    api_client_token: SecretStr | None = Field(
        None, description="Bearer token `conntrack-api get` sends."
    )
    api_client_token_file: Path | None = Field(
        None, description="File holding api_client_token (instead of the token)."
    )
    # Room for upstream's largest valid request (Send with 131072 bytes of data) and framing.
    api_max_message_bytes: int = Field(
        262_144, ge=1024, description="Largest request or response message."
    )
    # A Send is in flight for its whole round trip through Kafka and the node (~20 ms): at
    # 1,000 Sends/s that is 20 calls on average and 64 in a burst, where 64 shed them.
    # Behind an L4 load balancer a client keeps its one HTTP/2 connection, and so its replica,
    # for good: a maximum age makes it reconnect (and be balanced again) now and then.
    api_max_connection_age_seconds: float = Field(
        300.0,
        ge=0,
        description="A client connection older than this is asked to reconnect (GOAWAY; gRPC "
        "adds +-10% jitter), so load balancers spread long-lived clients again; 0: never.",
    )
    api_max_connection_age_grace_seconds: float = Field(
        30.0,
        ge=0,
        description="How long the calls of a connection past its maximum age may still run.",
    )
    api_keepalive_seconds: float = Field(
        60.0,
        ge=0,
        description="Ping a client connection quiet for this long and close it when the ping is "
        "not answered within 20 s (a client gone without a word); 0: no pings.",
    )
    api_max_concurrent_calls: int = Field(
        256, ge=1, description="Calls served at once; more are refused (RESOURCE_EXHAUSTED)."
    )
    api_db_timeout_seconds: float = Field(
        5.0, gt=0, description="Longest a read-model lookup may take."
    )
    api_db_pool_size: int = Field(10, ge=1, description="Read-model connections of the API.")
    # docs/api.md, "Reading from replicas": first healthy in the order given, with failover.
    api_read_database_urls: str = Field(
        "",
        description="PostgreSQL streaming replicas the API reads from, comma separated "
        "postgresql+asyncpg URLs, first healthy first; empty: the API reads database_url.",
    )
    api_read_database_urls_file: Path | None = Field(
        None, description="File holding api_read_database_urls (their passwords out of sight)."
    )
    api_command_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="Longest a Send or Disconnect waits for the gateway node's outcome (less "
        "when the caller's deadline is nearer).",
    )
    api_freshness_ttl_ms: int = Field(
        1000, ge=0, description="How long a read of the projection's freshness is reused."
    )
    # Get coalescing (api/read/batching.py): concurrent lookups share one query of at most
    # batch_max_ids ids; at most batch_max_in_flight such queries run at once, and under load
    # one starts at most every batch_window_ms (docs/api.md, "How a Get is answered").
    api_batch_max_ids: int = Field(
        256, ge=1, description="Most connection ids one shared lookup asks for."
    )
    api_batch_max_in_flight: int = Field(1, ge=1, description="Shared lookups running at once.")
    api_batch_window_ms: float = Field(
        3.0,
        ge=0,
        le=1000,
        description="Under load, least time between two shared lookups' starts; 0: off.",
    )
    # api/process/workers.py: `serve` as a supervisor of worker processes sharing the listen port.
    api_workers: int | None = Field(
        None,
        ge=1,
        description="Server processes sharing the listen port (SO_REUSEPORT); unset: the cores "
        "available to the process; 1: one process, no supervisor.",
    )

    # liveness (core/liveness.py; docs/api.md, "Gateway nodes and the lease"):
    # judged when the read model is read, never written into it.
    node_lease_seconds: float = Field(
        30.0,
        ge=0,
        description="A connection whose gateway node was not heard from for this long is gone "
        "(0: never); keep it well above the nodes' heartbeat interval (5 s by default).",
    )
    connection_idle_timeout_seconds: float = Field(
        0, ge=0, description="A connection with no activity for this long is gone; 0: never."
    )
    connection_max_lifetime_seconds: float = Field(
        0, ge=0, description="A connection open for longer than this is gone; 0: never."
    )

    # gateway: the reference gateway, conntrack-gateway (docs/gateway.md)
    gateway_listen: str = Field(
        "127.0.0.1:8765", description="host:port the reference gateway accepts WebSockets on."
    )
    gateway_id: str = Field(
        "conntrack-gateway", description="API gateway id the reference gateway's events carry."
    )
    gateway_node_id: str | None = Field(
        None, description="This gateway node's id (node role); unset: the host name."
    )
    gateway_heartbeat_seconds: float = Field(
        5.0, gt=0, description="Seconds between the node's heartbeats; well below the lease."
    )
    # The Publisher's delivery_timeout_s (docs/producer.md): its default is this one.
    gateway_delivery_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="Seconds the broker may take to acknowledge an event before the node counts "
        "the delivery as failed (with a spool: switches to spooling; without: reported).",
    )
    gateway_idle_timeout_seconds: float = Field(
        0,
        ge=0,
        description="The gateway closes a socket that received no message for this long "
        "(1001, told as IDLE_TIMEOUT); 0: never.",
    )
    gateway_max_lifetime_seconds: float = Field(
        0,
        ge=0,
        description="The gateway closes a socket open for longer than this (1001, told as "
        "MAX_LIFETIME); 0: never.",
    )
    # docs/producer.md, "Durable spool".
    gateway_spool_dir: Path | None = Field(
        None,
        description="Directory of the durable spool that holds events while the broker cannot "
        "take them, across restarts; unset: no spool.",
    )
    gateway_spool_max_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description="Most disk space the spool takes; beyond it new events are refused.",
    )
    # docs/gateway.md, "Who is connecting".
    gateway_auth: Literal["none", "jwt", "header"] = Field(
        "none",
        description="How a handshake names its principal: none; jwt (a bearer token verified "
        "with the key file); header (set by a trusted proxy in front of the gateway).",
    )
    gateway_jwt_key_file: Path | None = Field(
        None,
        description="jwt: a PEM public key (RS256 or ES256), a JWKS file (keys chosen by kid), "
        "or a file holding the HS256 shared secret (at least 32 bytes).",
    )
    gateway_jwt_principal_claim: str = Field(
        "sub", min_length=1, description="jwt: the claim that names the principal."
    )
    gateway_jwt_audience: str | None = Field(
        None, description="jwt: the audience (aud) tokens must carry; unset: not checked."
    )
    gateway_jwt_issuer: str | None = Field(
        None, description="jwt: the issuer (iss) tokens must carry; unset: not checked."
    )
    gateway_principal_header: str = Field(
        "X-Authenticated-User",
        min_length=1,
        description="header: the request header the trusted proxy names the principal in.",
    )
    gateway_labels: str = Field(
        "",
        description="Labels of each connection, as key=source:name pairs separated by commas; "
        "source is claim (jwt), header or query, e.g. "
        "'tenant=claim:tid,device=header:X-Device,app=query:v'.",
    )

    # lifecycle: the lifecycle role, conntrack-lifecycle (docs/lifecycle.md)
    lifecycle_topic: str = Field(
        "conntrack.lifecycle.v1",
        description="Topic the lifecycle role tells each connection's opened and closed on.",
    )
    lifecycle_state_topic: str = Field(
        "conntrack.lifecycle-state.v1",
        description="Compacted topic of the lifecycle role's state, written in its transactions.",
    )
    lifecycle_group: str = Field(
        "conntrack-lifecycle",
        description="Consumer group whose offsets the lifecycle role commits in its transactions.",
    )
    lifecycle_transactional_id: str = Field(
        "conntrack-lifecycle",
        description="Kafka transactional id of the lifecycle role: one process at a time holds "
        "it; a second one started fences the first.",
    )
    lifecycle_commit_interval_ms: int = Field(
        100, ge=1, description="Longest wait before what was read is told and committed."
    )
    lifecycle_remember_closed_seconds: float = Field(
        300,
        gt=0,
        description="How long a closed connection is remembered, so a late duplicate of its "
        "events is not told again (memory and state: one entry per connection closed within).",
    )

    # webhook: conntrack-lifecycle webhook, the lifecycle stream as signed HTTP POSTs
    webhook_url: str | None = Field(
        None, description="URL each lifecycle event is POSTed to as a CloudEvent (JSON)."
    )
    webhook_secret: SecretStr | None = Field(
        None,
        description="Shared secret of the X-Conntrack-Signature header (HMAC-SHA256 of the "
        "body); unset: requests are not signed.",
    )
    webhook_secret_file: Path | None = Field(None, description="File holding webhook_secret.")
    webhook_group: str = Field(
        "conntrack-lifecycle-webhook",
        description="Consumer group of the webhook sink (its processes share the partitions).",
    )
    webhook_dead_letter_topic: str = Field(
        "conntrack.lifecycle-webhook.dlq",
        description="Topic of the events the receiver did not take within webhook_max_attempts.",
    )
    webhook_timeout_seconds: float = Field(
        5.0, gt=0, description="Longest wait for the receiver's answer to one POST."
    )
    webhook_max_attempts: int = Field(
        12, ge=1, description="POSTs of one event before it goes to the dead-letter topic."
    )
    webhook_max_backoff_seconds: float = Field(
        10.0, gt=0, description="Longest wait between two POSTs of one event."
    )
    webhook_concurrency: int = Field(
        32, ge=1, description="Connections whose events are POSTed at once (each in order)."
    )

    # rebuild (docs/rebuild.md)
    rebuild_batch_events: int = Field(20_000, ge=1, description="Rebuild: records per commit.")
    rebuild_max_events_per_second: float | None = Field(
        None, gt=0, description="Rebuild: throttle to spare the database; unset: no limit."
    )
    rebuild_max_switch_gap: int = Field(
        2_000,
        ge=0,
        description="Rebuild: switch only when the live projection is at most this many "
        "records ahead (folded while the live writers wait).",
    )
    rebuild_lock_timeout_seconds: float = Field(
        2.0, gt=0, description="Rebuild: how long a switch waits for its locks (PostgreSQL)."
    )

    # metrics
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus port; 0: no endpoint.")
    api_metrics_host: str | None = Field(
        None, description="Host the API's metrics endpoint binds to; unset: api_listen's host."
    )

    # logging and the process
    log_level: str = Field("INFO", description="Python logging level.")
    log_format: Literal["text", "json"] = Field(
        "text", description="text: `time level logger: message` lines; json: one object a line."
    )
    # conntrack.core.process.tune_gc
    gc_gen0_threshold: int | None = Field(
        None,
        ge=0,
        description="Allocations between young-generation collections; unset: each command's "
        "choice; 0: Python's defaults.",
    )

    @model_validator(mode="before")
    @classmethod
    def _secrets_from_files(cls, data: Any) -> Any:
        """<setting>_file: the setting's value is the file's content (without the line end)."""
        if not isinstance(data, dict):
            return data
        for name in FILE_SECRETS:
            path = data.get(f"{name}_file")
            if path in (None, ""):
                continue
            if data.get(name) not in (None, ""):
                raise ValueError(f"give {env_name(name)} or {env_name(name + '_file')}, not both")
            try:
                value = Path(path).read_text().rstrip("\r\n")
            except OSError as exc:
                raise ValueError(
                    f"cannot read {env_name(name + '_file')} = {str(path)!r}: {exc.strerror}"
                ) from None
            if not value:
                raise ValueError(f"{env_name(name + '_file')} = {str(path)!r} is empty")
            data = {**data, name: value}
        return data

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, url: str) -> str:
        scheme = url.split("://", 1)[0] if "://" in url else ""
        if scheme not in DATABASE_SCHEMES:
            raise ValueError(
                f"the read model needs an async driver: use {DATABASE_SCHEMES[0]}:///PATH or "
                f"{DATABASE_SCHEMES[1]}://USER:PASSWORD@HOST:PORT/DB, not {scheme or url!r}"
            )
        if scheme == DATABASE_SCHEMES[1]:
            postgres_connect_arguments(url)  # DatabaseUrlError (a ValueError) names the problem
        return url

    @field_validator("api_read_database_urls")
    @classmethod
    def _replica_urls(cls, urls: str) -> str:
        listed = split_urls(urls)
        for url in listed:
            scheme = url.split("://", 1)[0] if "://" in url else ""
            if scheme != REPLICA_SCHEME:
                # Only the scheme: the rest may hold a password.
                raise ValueError(
                    f"each read replica needs {REPLICA_SCHEME}://USER:PASSWORD@HOST:PORT/DB, "
                    f"not {scheme + '://...' if scheme else 'a URL without a scheme'}"
                )
            postgres_connect_arguments(url)
        if len(set(listed)) != len(listed):
            raise ValueError("a read replica is listed twice")
        return urls

    @field_validator("kafka_security_protocol", "kafka_sasl_mechanism", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("log_level")
    @classmethod
    def _level(cls, level: str) -> str:
        if level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("use DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return level.upper()


SECTIONS: dict[str, tuple[str, ...]] = {
    "kafka": (
        "kafka_bootstrap_servers",
        "kafka_security_protocol",
        "kafka_sasl_mechanism",
        "kafka_sasl_username",
        "kafka_sasl_password",
        "kafka_sasl_password_file",
        "kafka_ssl_cafile",
        "kafka_ssl_certfile",
        "kafka_ssl_keyfile",
        "kafka_ssl_key_password",
        "kafka_ssl_key_password_file",
        "kafka_client_id",
        "events_topic",
        "dead_letter_topic",
        "commands_topic",
        "command_outcomes_topic",
        "commands_linger_ms",
        "commands_fetch_wait_ms",
    ),
    "database": ("database_url", "database_url_file"),
    "projector": (
        "consumer_group",
        "batch_max_events",
        "batch_max_wait_ms",
        "refused_batch_attempts",
        "retry_max_backoff_seconds",
        "consumer_session_timeout_ms",
    ),
    "retention": (
        "retention_disconnected_seconds",
        "retention_tombstone_seconds",
        "retention_interval_seconds",
    ),
    "history": ("history_days",),
    "api": tuple(n for n in Settings.model_fields if n.startswith("api_")),
    "liveness": (
        "node_lease_seconds",
        "connection_idle_timeout_seconds",
        "connection_max_lifetime_seconds",
    ),
    "rebuild": tuple(n for n in Settings.model_fields if n.startswith("rebuild_")),
    "lifecycle": tuple(n for n in Settings.model_fields if n.startswith("lifecycle_")),
    "webhook": tuple(n for n in Settings.model_fields if n.startswith("webhook_")),
    "gateway": tuple(n for n in Settings.model_fields if n.startswith("gateway_")),
    "metrics": ("metrics_port",),
    "logging": ("log_level", "log_format", "gc_gen0_threshold"),
}
assert sorted(n for names in SECTIONS.values() for n in names) == sorted(Settings.model_fields)

# Who reads each section, for the configuration reference (docs/configuration.md).
SECTION_READERS: dict[str, str] = {
    "kafka": "every command that talks to Kafka",
    "database": "conntrack-projector, conntrack-api serve, conntrack-migrate, conntrack-audit",
    "projector": "conntrack-projector",
    "retention": "conntrack-projector",
    "history": "conntrack-projector, conntrack-api serve",
    "api": "conntrack-api",
    "liveness": "conntrack-api serve, conntrack-lifecycle (the lease)",
    "rebuild": "conntrack-audit rebuild",
    "lifecycle": "conntrack-lifecycle",
    "webhook": "conntrack-lifecycle webhook",
    "gateway": "conntrack-gateway",
    "metrics": "conntrack-projector, conntrack-api serve, conntrack-lifecycle, conntrack-gateway",
    "logging": "every command",
}
assert SECTION_READERS.keys() == SECTIONS.keys()


def default(setting: str) -> Any:
    """A setting's default, for components that can be built without the whole settings (in
    tests, as a library): the value is stated once, above."""
    return Settings.model_fields[setting].default


def env_name(setting: str) -> str:
    return ENV_PREFIX + setting.upper()


def settings_from(**flags: Any) -> Settings:
    """Settings from the environment with the command-line flags that were given on top (a flag
    left at None was not given and does not override anything)."""
    return Settings(**{name: value for name, value in flags.items() if value is not None})


# Secrets that may be given as a file instead, in <setting>_file (kafka_sasl_password_file and
# api_tokens_file are read where they are used: core/kafka.py, api/transport/auth.py).
FILE_SECRETS = (
    "database_url",
    "webhook_secret",
    "api_read_database_urls",
    "kafka_ssl_key_password",
    "api_client_token",
)
