"""The API's pure parts: connection_id validation, request parsing that never raises, bearer
tokens, the freshness header's format, and the TLS / token configuration checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conntrack.api.application.call import UndecodableRequest
from conntrack.api.application.freshness import format_positions, parse_positions
from conntrack.api.application.service import to_proto
from conntrack.api.read.repository import ConnectionView, PartitionPosition
from conntrack.api.transport.auth import BearerTokens, TokenConfigError, load_tokens
from conntrack.api.transport.grpc_handlers import tolerant_parser
from conntrack.api.transport.tls import ServerTls, TlsConfigError, client_credentials
from conntrack.core.ids import UPSTREAM_CONNECTION_ID_LENGTH
from conntrack.core.ids import upstream_connection_id_problem as connection_id_problem
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2 as svc,
)
from conntrack.core.timeutil import to_ns


@given(st.text(max_size=120))
def test_connection_id_rule_is_required_and_at_most_50_characters(value: str) -> None:
    problem = connection_id_problem(value)
    if 1 <= len(value) <= UPSTREAM_CONNECTION_ID_LENGTH:
        assert problem is None
    else:
        assert problem is not None
        assert problem.startswith("connection_id ")


def test_connection_id_length_counts_characters_not_bytes() -> None:
    assert connection_id_problem("é" * 50) is None  # 100 UTF-8 bytes
    assert connection_id_problem("é" * 51) is not None


@given(st.binary(max_size=300))
def test_request_parser_never_raises(data: bytes) -> None:
    parsed = tolerant_parser(svc.GetConnectionRequest)(data)
    assert isinstance(parsed, svc.GetConnectionRequest | UndecodableRequest)


@given(st.text(max_size=60))
def test_request_parser_round_trips_valid_requests(connection_id: str) -> None:
    body = svc.GetConnectionRequest(connection_id=connection_id).SerializeToString()
    parsed = tolerant_parser(svc.GetConnectionRequest)(body)
    assert isinstance(parsed, svc.GetConnectionRequest)
    assert parsed.connection_id == connection_id


def test_request_parser_reports_invalid_utf8() -> None:
    parsed = tolerant_parser(svc.GetConnectionRequest)(b"\x0a\x01\xff")
    assert isinstance(parsed, UndecodableRequest)
    assert parsed.message_type == "GetConnectionRequest"


@given(st.integers(0, 2**62), st.integers(0, 2**62))
def test_to_proto_keeps_nanoseconds(connected: int, active: int) -> None:
    view = ConnectionView("c", "g", "ip", "ua", connected, active)
    message = to_proto(view)
    assert (to_ns(message.connected_at), to_ns(message.last_active_at)) == (connected, active)


_topics = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-",
    min_size=1,
    max_size=40,
)


@given(st.dictionaries(st.tuples(_topics, st.integers(0, 10_000)), st.integers(0, 2**63 - 1)))
def test_position_header_round_trips(positions: dict[tuple[str, int], int]) -> None:
    items = tuple(PartitionPosition(t, p, o) for (t, p), o in sorted(positions.items()))
    header = format_positions(items)
    assert header.isascii()
    assert header.isprintable()
    assert parse_positions(header) == positions


def test_bearer_tokens_accept_only_configured_tokens() -> None:
    tokens = BearerTokens(["alpha-1", "beta-2"])
    assert tokens.accepts([("authorization", "Bearer alpha-1")])
    assert tokens.accepts([("x-other", "1"), ("authorization", "bearer beta-2")])
    for metadata in (
        None,
        [],
        [("authorization", "Bearer alpha")],
        [("authorization", "Bearer alpha-1-")],
        [("authorization", "alpha-1")],
        [("authorization", "Basic alpha-1")],
        [("authorization-bin", b"Bearer alpha-1")],
        [("authorization", "Bearer ")],
    ):
        assert not tokens.accepts(metadata)
    assert "alpha" not in repr(tokens)


def test_load_tokens_from_string_and_file(tmp_path: Path) -> None:
    file = tmp_path / "tokens"
    file.write_text("# comment\n  one  \n\ntwo\none\n")
    assert load_tokens("three, four", file) == ("three", "four", "one", "two")
    assert load_tokens(None, None) == ()
    assert load_tokens("", None) == ()


@pytest.mark.parametrize(
    ("inline", "content", "message"),
    [
        (None, "# nothing\n\n", "holds no token"),
        ("has space", None, "printable ASCII"),
        ("ключ", None, "printable ASCII"),
    ],
)
def test_unusable_tokens_are_refused(
    tmp_path: Path, inline: str | None, content: str | None, message: str
) -> None:
    file = None
    if content is not None:
        file = tmp_path / "tokens"
        file.write_text(content)
    with pytest.raises(TokenConfigError, match=message):
        load_tokens(inline, file)


def test_missing_token_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TokenConfigError, match="cannot read token file"):
        load_tokens(None, tmp_path / "absent")


def test_tls_configuration_must_be_complete(tmp_path: Path) -> None:
    cert, key, ca = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem"
    assert ServerTls.from_files(None, None, None) is None
    with pytest.raises(TlsConfigError, match="both"):
        ServerTls.from_files(cert, None, None)
    with pytest.raises(TlsConfigError, match="client CA"):
        ServerTls.from_files(None, None, ca)
    tls = ServerTls.from_files(cert, key, ca)
    assert tls is not None
    assert tls.mutual
    with pytest.raises(TlsConfigError, match="cannot read TLS key file"):
        tls.credentials()
    key.write_text("")
    with pytest.raises(TlsConfigError, match="is empty"):
        tls.credentials()
    with pytest.raises(TlsConfigError, match="both"):
        client_credentials(ca, cert, None)
