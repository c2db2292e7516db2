"""KafkaConnection: the one builder of every Kafka client's connection options (pure: no broker;
the secured broker itself is exercised in tests/integration/test_kafka_secured.py)."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.abc import AbstractTokenProvider

from conntrack.core import cli
from conntrack.core.kafka import KafkaConnection, KafkaSetupError, close, connection_of
from conntrack.core.settings import SECTIONS, Settings

SECRET = "s3cret-passw0rd"


def settings(**values: Any) -> Settings:
    return Settings(**values)


def test_plain_by_default() -> None:
    conn = KafkaConnection.from_settings(settings(kafka_bootstrap_servers="h1:9092"), "projector")
    assert conn.options() == {
        "bootstrap_servers": "h1:9092",
        "client_id": "conntrack-projector",
        "security_protocol": "PLAINTEXT",
    }


def test_client_id_is_prefix_and_component() -> None:
    s = settings(kafka_client_id="edge7")
    assert KafkaConnection.from_settings(s, "api").client_id == "edge7-api"
    assert connection_of("h:1", "publisher").client_id == "conntrack-publisher"
    given = KafkaConnection("h:1", client_id="mine")
    assert connection_of(given, "publisher") is given


def test_sasl_ssl_scram_options(tmp_path: Path) -> None:
    ca = _self_signed_ca(tmp_path)
    s = settings(
        kafka_bootstrap_servers="b1:9094,b2:9094",
        kafka_security_protocol="sasl_ssl",  # case-insensitive
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="svc",
        kafka_sasl_password=SECRET,
        kafka_ssl_cafile=ca,
    )
    opts = KafkaConnection.from_settings(s, "topics").options()
    context = opts.pop("ssl_context")
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert opts == {
        "bootstrap_servers": "b1:9094,b2:9094",
        "client_id": "conntrack-topics",
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "svc",
        "sasl_plain_password": SECRET,
    }

    # aiokafka accepts them as they are.
    async def build() -> None:
        await AIOKafkaProducer(**KafkaConnection.from_settings(s, "topics").options()).stop()

    asyncio.run(build())


def test_ssl_without_cafile_uses_system_cas() -> None:
    conn = KafkaConnection("h:9093", security_protocol="SSL")
    context = conn.options()["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.cert_store_stats()["x509_ca"] >= 0  # the default store, loaded or empty
    assert "sasl_mechanism" not in conn.options()


def test_password_from_file(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    path.write_text(SECRET + "\n")
    s = settings(
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_username="svc",
        kafka_sasl_password_file=path,
    )
    assert KafkaConnection.from_settings(s, "x").options()["sasl_plain_password"] == SECRET


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"kafka_security_protocol": "SASL_SSL"}, "needs CONNTRACK_KAFKA_SASL_USERNAME"),
        (
            {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_username": "u"},
            "CONNTRACK_KAFKA_SASL_PASSWORD",
        ),
        ({"kafka_ssl_cafile": "/ca.pem"}, "does not use TLS"),
        ({"kafka_sasl_password": "p"}, "does not use SASL"),
        (
            {"kafka_security_protocol": "SSL", "kafka_ssl_keyfile": "/k.pem"},
            "needs its certificate",
        ),
        (
            {
                "kafka_security_protocol": "SASL_SSL",
                "kafka_sasl_username": "u",
                "kafka_sasl_password": "p",
                "kafka_sasl_password_file": "/pw",
            },
            "not both",
        ),
        (
            {
                "kafka_security_protocol": "SASL_SSL",
                "kafka_sasl_username": "u",
                "kafka_sasl_password_file": "/nonexistent/pw",
            },
            "cannot read CONNTRACK_KAFKA_SASL_PASSWORD_FILE",
        ),
    ],
)
def test_settings_that_do_not_fit_are_one_clear_error(values: dict[str, Any], message: str) -> None:
    with pytest.raises(KafkaSetupError, match=message) as raised:
        KafkaConnection.from_settings(settings(**values), "x")
    assert "\n" not in str(raised.value)


def test_unloadable_ca_file_is_a_setup_error(tmp_path: Path) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    conn = KafkaConnection("h:1", security_protocol="SSL", ssl_cafile=bogus)
    with pytest.raises(KafkaSetupError, match="CONNTRACK_KAFKA_SSL_CAFILE"):
        conn.options()
    missing = KafkaConnection("h:1", security_protocol="SSL", ssl_cafile=tmp_path / "nope.pem")
    with pytest.raises(KafkaSetupError, match="cannot load the Kafka TLS files"):
        missing.options()


def test_settings_reject_unknown_protocol_and_mechanism() -> None:
    with pytest.raises(ValueError, match="kafka_security_protocol"):
        settings(kafka_security_protocol="TLS")
    with pytest.raises(ValueError, match="kafka_sasl_mechanism"):
        settings(kafka_sasl_mechanism="GSSAPI")
    with pytest.raises(KafkaSetupError, match="PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"):
        KafkaConnection("h:1", security_protocol="TLS")


def test_secrets_are_never_shown(tmp_path: Path) -> None:
    s = settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_username="svc",
        kafka_sasl_password=SECRET,
        kafka_ssl_certfile="/client.pem",
        kafka_ssl_key_password="keypass",
    )
    conn = KafkaConnection.from_settings(s, "api")
    for text in (repr(conn), str(conn), repr(s)):
        assert SECRET not in text
        assert "keypass" not in text
    help_text = cli.parser("x", None, ["kafka"]).format_help()
    for flag in (
        "--kafka-security-protocol",
        "--kafka-sasl-mechanism",
        "--kafka-sasl-username",
        "--kafka-sasl-password",
        "--kafka-sasl-password-file",
        "--kafka-ssl-cafile",
        "--kafka-ssl-certfile",
        "--kafka-ssl-keyfile",
        "--kafka-ssl-key-password",
        "--kafka-client-id",
    ):
        assert flag in help_text
    assert all(name in SECTIONS["kafka"] for name in Settings.model_fields if "sasl" in name)


class _Tokens(AbstractTokenProvider):  # type: ignore[misc]  # aiokafka is untyped
    async def token(self) -> str:
        return "t0ken"


def test_oauthbearer_for_library_users_with_a_token_provider() -> None:
    provider = _Tokens()
    conn = KafkaConnection(
        "h:9094",
        security_protocol="SASL_SSL",
        sasl_mechanism="OAUTHBEARER",
        token_provider=provider,
    )
    opts = conn.options()
    assert opts["sasl_mechanism"] == "OAUTHBEARER"
    assert opts["sasl_oauth_token_provider"] is provider
    assert "sasl_plain_password" not in opts
    with pytest.raises(KafkaSetupError, match="token provider"):
        KafkaConnection("h:9094", security_protocol="SASL_SSL", sasl_mechanism="OAUTHBEARER")
    # Not offered as a setting: a command has no way to give a token provider.
    with pytest.raises(ValueError, match="kafka_sasl_mechanism"):
        settings(kafka_sasl_mechanism="OAUTHBEARER")


def test_hosts() -> None:
    conn = KafkaConnection("a:1, b:2,[::1]:3")
    assert conn.hosts == [("a", 1), ("b", 2), ("::1", 3)]


class _Client:
    def __init__(self, fail: BaseException | None = None) -> None:
        self.fail = fail
        self.stopped = False

    async def stop(self) -> None:
        self.stopped = True
        if self.fail is not None:
            raise self.fail


class _Admin:
    closed = False

    async def close(self) -> None:
        self.closed = True


def test_close_stops_every_client_even_when_one_raises() -> None:
    clients = [_Client(RuntimeError("boom")), _Client(asyncio.CancelledError()), _Client()]
    admin = _Admin()
    asyncio.run(close(*clients, None, admin))
    assert all(c.stopped for c in clients)
    assert admin.closed


def test_close_passes_on_its_own_cancellation() -> None:
    async def main() -> bool:
        gate = asyncio.Event()
        second = _Client()

        class Slow(_Client):
            async def stop(self) -> None:
                self.stopped = True
                await gate.wait()

        task = asyncio.create_task(close(Slow(), second))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return second.stopped

    assert asyncio.run(main())


def _self_signed_ca(tmp_path: Path) -> Path:
    ca = tmp_path / "ca.pem"
    key = tmp_path / "ca.key"
    try:
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=test",
                "-keyout",
                str(key),
                "-out",
                str(ca),
            ],
            check=True,
            capture_output=True,
        )
    except FileNotFoundError:
        pytest.skip("openssl is not installed")
    return ca
