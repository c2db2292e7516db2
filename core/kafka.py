"""How every Kafka client of the system connects: one home for the connection settings (the
bootstrap servers, TLS, SASL, the client id), for starting a client so that a refusal caused by
a setting reads as one clear line, and for closing clients.

KafkaConnection is built from the settings (KafkaConnection.from_settings, one client id per
component: conntrack-projector, conntrack-api, ...) or, by library users, directly; its
options() are the keyword arguments of AIOKafkaProducer, AIOKafkaConsumer and
AIOKafkaAdminClient alike.

aiokafka reports a wrong password or an untrusted broker certificate the way it reports a broker
that is down ("Unable to bootstrap from ...", the cause only in an ERROR log line), and a
component that waits out an unavailable broker would then wait forever. start() asks once more,
on a connection of its own, why the broker refused, and raises KafkaSetupError for what retrying
cannot fix; commands report it as one line and exit 2 (core/cli.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from aiokafka.abc import AbstractTokenProvider
from aiokafka.conn import create_conn
from aiokafka.errors import (
    IllegalSaslStateError,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.helpers import create_ssl_context
from aiokafka.partitioner import DefaultPartitioner, murmur2
from pydantic import SecretStr

from conntrack.core.settings import default, env_name

if TYPE_CHECKING:
    from conntrack.core.settings import Settings

log = logging.getLogger(__name__)

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
# OAUTHBEARER needs a token provider, which only library users can give (token_provider).
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")

# How long the diagnosis of a failed start may take per bootstrap server.
_DIAGNOSE_TIMEOUT_S = 10.0


class KafkaSetupError(Exception):
    """The broker refused this client for a reason only a setting can fix (credentials, the CA,
    the security protocol), or the settings themselves do not fit together."""


class _Client(Protocol):
    async def start(self) -> None: ...


@dataclass(frozen=True)
class KafkaConnection:
    """Where and how to connect; options() gives the aiokafka keyword arguments.

    `KafkaConnection("host:9092")` is a plain connection, what the library entry points build
    from bootstrap servers alone."""

    bootstrap_servers: str
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "PLAIN"
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_key_password: SecretStr | None = None
    client_id: str = default("kafka_client_id")
    # OAUTHBEARER (library users): provides the tokens.
    token_provider: AbstractTokenProvider | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        protocol = self.security_protocol.upper()
        mechanism = self.sasl_mechanism.upper()
        object.__setattr__(self, "security_protocol", protocol)
        object.__setattr__(self, "sasl_mechanism", mechanism)
        if not self.bootstrap_servers.strip():
            raise KafkaSetupError(f"{env_name('kafka_bootstrap_servers')} is empty")
        if protocol not in SECURITY_PROTOCOLS:
            raise KafkaSetupError(
                f"{env_name('kafka_security_protocol')} = {protocol!r}: use one of "
                + ", ".join(SECURITY_PROTOCOLS)
            )
        if self.sasl:
            if mechanism not in SASL_MECHANISMS:
                raise KafkaSetupError(
                    f"{env_name('kafka_sasl_mechanism')} = {mechanism!r}: use one of "
                    + ", ".join(SASL_MECHANISMS)
                )
            if mechanism == "OAUTHBEARER":
                if self.token_provider is None:
                    raise KafkaSetupError(
                        "SASL OAUTHBEARER needs a token provider (KafkaConnection's "
                        "token_provider, for library users)"
                    )
            elif not self.sasl_username or self.sasl_password is None:
                raise KafkaSetupError(
                    f"{env_name('kafka_security_protocol')} = {protocol} needs "
                    f"{env_name('kafka_sasl_username')} and {env_name('kafka_sasl_password')} "
                    f"(or {env_name('kafka_sasl_password_file')})"
                )
        if not self.sasl and (self.sasl_username or self.sasl_password is not None):
            raise KafkaSetupError(
                f"{env_name('kafka_sasl_username')}/{env_name('kafka_sasl_password')} are set "
                f"but {env_name('kafka_security_protocol')} = {protocol} does not use SASL "
                "(SASL_SSL or SASL_PLAINTEXT does)"
            )
        if (self.ssl_keyfile is not None or self.ssl_key_password is not None) and (
            self.ssl_certfile is None
        ):
            raise KafkaSetupError(
                f"a client key needs its certificate: set {env_name('kafka_ssl_certfile')}"
            )
        if not self.tls and (self.ssl_cafile or self.ssl_certfile):
            raise KafkaSetupError(
                f"{env_name('kafka_ssl_cafile')}/{env_name('kafka_ssl_certfile')} are set but "
                f"{env_name('kafka_security_protocol')} = {protocol} does not use TLS "
                "(SSL or SASL_SSL does)"
            )

    @classmethod
    def from_settings(cls, settings: Settings, component: str) -> KafkaConnection:
        """The connection of one component (its client id: `<kafka_client_id>-<component>`).
        A password file is read here; a file that cannot be read is a KafkaSetupError."""
        password = settings.kafka_sasl_password
        if settings.kafka_sasl_password_file is not None:
            if password is not None:
                raise KafkaSetupError(
                    f"set {env_name('kafka_sasl_password')} or "
                    f"{env_name('kafka_sasl_password_file')}, not both"
                )
            password = SecretStr(_read_secret(settings.kafka_sasl_password_file))
        return cls(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            security_protocol=settings.kafka_security_protocol,
            sasl_mechanism=settings.kafka_sasl_mechanism,
            sasl_username=settings.kafka_sasl_username,
            sasl_password=password,
            ssl_cafile=settings.kafka_ssl_cafile,
            ssl_certfile=settings.kafka_ssl_certfile,
            ssl_keyfile=settings.kafka_ssl_keyfile,
            ssl_key_password=settings.kafka_ssl_key_password,
            client_id=f"{settings.kafka_client_id}-{component}",
        )

    def for_component(self, component: str) -> KafkaConnection:
        """The same connection with the client id `<this client id>-<component>`."""
        return dataclasses.replace(self, client_id=f"{self.client_id}-{component}")

    @property
    def tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @property
    def hosts(self) -> list[tuple[str, int]]:
        out = []
        for server in self.bootstrap_servers.split(","):
            host, _, port = server.strip().rpartition(":")
            out.append((host.strip("[]") or server.strip(), int(port) if port.isdigit() else 9092))
        return out

    def ssl_context(self) -> ssl.SSLContext | None:
        """A new client TLS context (None without TLS): the CA file, or the system's CAs; the
        client certificate if one is set. A file that cannot be loaded is a KafkaSetupError."""
        if not self.tls:
            return None
        key_password = self.ssl_key_password
        try:
            context: ssl.SSLContext = create_ssl_context(
                cafile=self.ssl_cafile,
                certfile=self.ssl_certfile,
                keyfile=self.ssl_keyfile,
                password=key_password.get_secret_value() if key_password else None,
            )
        except (OSError, ssl.SSLError) as exc:
            raise KafkaSetupError(
                f"cannot load the Kafka TLS files (CA {self.ssl_cafile or 'system'}, "
                f"certificate {self.ssl_certfile or 'none'}): {exc}; check "
                f"{env_name('kafka_ssl_cafile')}, {env_name('kafka_ssl_certfile')}, "
                f"{env_name('kafka_ssl_keyfile')}"
            ) from None
        return context

    def options(self) -> dict[str, Any]:
        """Keyword arguments for AIOKafkaProducer, AIOKafkaConsumer or AIOKafkaAdminClient."""
        opts: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.tls:
            opts["ssl_context"] = self.ssl_context()
        if self.sasl:
            opts["sasl_mechanism"] = self.sasl_mechanism
            if self.sasl_mechanism == "OAUTHBEARER":
                opts["sasl_oauth_token_provider"] = self.token_provider
            else:
                opts["sasl_plain_username"] = self.sasl_username
                assert self.sasl_password is not None  # checked in __post_init__
                opts["sasl_plain_password"] = self.sasl_password.get_secret_value()
        return opts

    async def diagnose(self) -> KafkaSetupError | None:
        """Why the brokers refuse this client, if a setting is the cause; None if they could
        not be reached at all (or let it in after all)."""
        opts = self.options()
        conn_opts = {
            k: v
            for k, v in opts.items()
            if k in ("client_id", "security_protocol", "ssl_context") or k.startswith("sasl_")
        }
        for host, port in self.hosts:
            where = f"{host}:{port}"
            try:
                async with asyncio.timeout(_DIAGNOSE_TIMEOUT_S):
                    conn = await create_conn(
                        host, port, request_timeout_ms=int(_DIAGNOSE_TIMEOUT_S * 1000), **conn_opts
                    )
            except (SaslAuthenticationFailed, IllegalSaslStateError) as exc:
                return KafkaSetupError(
                    f"Kafka at {where} refused the {self.sasl_mechanism} login of "
                    f"{self.sasl_username!r} ({_message(exc)}); check "
                    f"{env_name('kafka_sasl_username')} and {env_name('kafka_sasl_password')} "
                    f"(or {env_name('kafka_sasl_password_file')})"
                )
            except UnsupportedSaslMechanismError as exc:
                return KafkaSetupError(
                    f"Kafka at {where}: {_message(exc)}; check {env_name('kafka_sasl_mechanism')}"
                )
            except ssl.SSLCertVerificationError as exc:
                return KafkaSetupError(
                    f"the TLS certificate of Kafka at {where} is not trusted "
                    f"({exc.verify_message}); check {env_name('kafka_ssl_cafile')} "
                    f"(now {self.ssl_cafile or 'the system CAs'})"
                )
            except ssl.SSLError as exc:
                return KafkaSetupError(
                    f"TLS with Kafka at {where} failed ({exc.reason or exc}); check "
                    f"{env_name('kafka_security_protocol')} (now {self.security_protocol}) and "
                    "the listener's protocol"
                )
            except (OSError, KafkaError, TimeoutError):
                continue  # unreachable, or gone meanwhile: not a setting's fault
            conn.close()
        return None


def connection_of(servers: str | KafkaConnection, component: str) -> KafkaConnection:
    """What library entry points take: a KafkaConnection as it is, or bootstrap servers alone
    (a plain connection, client id `conntrack-<component>`)."""
    if isinstance(servers, KafkaConnection):
        return servers
    return KafkaConnection(servers).for_component(component)


# How long a cancelled start may still take to end by itself (see start()).
_CANCELLED_START_GRACE_S = 5.0


async def start(client: _Client, connection: KafkaConnection) -> None:
    """client.start(); a refusal a setting causes is raised as KafkaSetupError (see the module
    doc), anything else as aiokafka raised it. On failure the client is left for the caller to
    close, as after a failed client.start().

    A cancellation (a command or the API stopping while it connects) is passed on only once the
    start has ended, within a grace period: aiokafka 0.14's bootstrap cancelled while it waits
    for the first metadata answer drops its bootstrap connection without closing it, and
    nothing can close it after that (it is found unclosed, and logged at ERROR, at exit)."""
    starting = asyncio.ensure_future(client.start())
    try:
        await asyncio.shield(starting)
    except KafkaConnectionError:
        problem = await connection.diagnose()
        if problem is not None:
            raise problem from None
        raise
    except asyncio.CancelledError:
        try:  # at once if it has ended; its outcome is retrieved either way
            await asyncio.wait_for(starting, _CANCELLED_START_GRACE_S)
        except (Exception, asyncio.CancelledError):  # the start's own end does not matter
            log.debug("a cancelled Kafka client start ended with an error", exc_info=True)
        raise


async def close(*clients: Any) -> None:
    """Stop every client (AIOKafkaProducer, AIOKafkaConsumer: stop(); AIOKafkaAdminClient:
    close(); None is skipped), even when one raises, so that none leaves its connections open.
    aiokafka 0.14's consumer.stop() can let out the cancellation of its own fetch task (one
    waiting to retry while the broker is away) before it closes its connections: they are
    closed here then. A cancellation of this task itself is passed on once all are stopped."""
    for client in clients:
        if client is None:
            continue
        stop = getattr(client, "stop", None) or client.close
        try:
            await stop()
        except asyncio.CancelledError:
            log.debug("closing a Kafka client was cut short", exc_info=True)
            inner = getattr(client, "_client", None)
            if inner is not None:
                try:
                    await inner.close()
                except (Exception, asyncio.CancelledError):  # best effort
                    log.debug("closing a Kafka client's connections failed", exc_info=True)
        except Exception:  # closing is best effort
            log.debug("closing a Kafka client failed", exc_info=True)
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def partition_of(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives a keyed record (murmur2 of the key, as
    the Java client, aiokafka, franz-go and librdkafka's murmur2_random): where the gateway's
    events of one connection, a node's commands and an API's outcomes go."""
    hashed: int = murmur2(key)
    return (hashed & 0x7FFFFFFF) % partitions


class KeyPartitioner:
    """aiokafka's default partitioner (murmur2 of the key, as the Java client's) remembering its
    answer per key and partition count: a producer whose records carry a few keys over and over
    (the API's commands, keyed by node id; a node's outcomes, keyed by an API's reply address)
    otherwise runs the pure-Python murmur2 for every record (about 3% of a gateway node's CPU
    at 1,000 Sends/s). Records without a key are spread as DefaultPartitioner spreads them.
    Pass an instance as AIOKafkaProducer(partitioner=...)."""

    def __init__(self, max_keys: int = 4096) -> None:
        self._partitioner = DefaultPartitioner()
        self._max_keys = max_keys
        self._known: dict[tuple[bytes, int], int] = {}

    def __call__(
        self, key: bytes | None, all_partitions: list[int], available: list[int] | None
    ) -> int:
        if key is None:
            return int(self._partitioner(key, all_partitions, available))
        known = self._known.get((key, len(all_partitions)))
        if known is None:
            if len(self._known) >= self._max_keys:
                self._known.clear()
            known = all_partitions[partition_of(key, len(all_partitions))]
            self._known[(key, len(all_partitions))] = known
        return known


def _read_secret(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KafkaSetupError(
            f"cannot read {env_name('kafka_sasl_password_file')} = {str(path)!r}: "
            f"{exc.strerror if isinstance(exc, OSError) else exc}"
        ) from None
    secret = text.rstrip("\r\n")
    if not secret:
        raise KafkaSetupError(f"{env_name('kafka_sasl_password_file')} = {str(path)!r} is empty")
    return secret


def _message(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
