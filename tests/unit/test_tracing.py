"""Tracing's configuration is read the usual OpenTelemetry way, and off (the default) it adds
nothing: no headers on records, no spans."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conntrack.core import tracing
from conntrack.core.cli import CommandError
from conntrack.core.tracing_setup import traced, wanted

ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        (ENDPOINT, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, True),
        ({**ENDPOINT, "OTEL_SDK_DISABLED": "true"}, False),
        ({**ENDPOINT, "OTEL_TRACES_EXPORTER": "none"}, False),
        ({**ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, True),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, False),  # no endpoint: off anyway
    ],
)
def test_tracing_is_on_only_with_an_endpoint(env: dict[str, str], on: bool) -> None:
    assert wanted(env) is on


@pytest.mark.parametrize(
    ("env", "named"),
    [
        (
            {**ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
        (
            {**ENDPOINT, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"},
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        ),
        ({**ENDPOINT, "OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
    ],
)
def test_an_exporter_that_cannot_work_is_one_usage_line(env: dict[str, str], named: str) -> None:
    with pytest.raises(CommandError) as refused:
        wanted(env)
    assert refused.value.code == 2
    assert str(refused.value).startswith(named)
    assert "\n" not in str(refused.value)


def test_off_nothing_is_installed_or_added() -> None:
    with traced("conntrack-test", servers=True, database=True, env={}) as on:
        assert on is False
        assert not tracing.installed()
        with tracing.span("anything") as span:
            assert span is None
        with tracing.sending("topic", "key") as headers:
            assert headers == []
        with tracing.processing(
            "topic", [("traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01")]
        ) as span:
            assert span is None


def test_the_context_in_headers_is_read_and_linked() -> None:
    traceparent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    headers = [("conntrack-event", b"x"), ("traceparent", traceparent)]
    assert tracing.context_of([("conntrack-event", b"x")]) is None
    assert tracing.context_of(headers) is not None
    (link,) = tracing.links([headers, None, [("traceparent", b"garbage")]])
    assert f"{link.context.trace_id:032x}" == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert len(tracing.links([headers] * 500)) == tracing.MAX_LINKS


@pytest.mark.parametrize("command", [["conntrack-api", "serve"], ["conntrack-projector"]])
def test_a_service_refuses_it_in_one_line_before_starting(command: list[str]) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CONNTRACK_", "OTEL_"))},
        **ENDPOINT,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
    }
    done = subprocess.run(
        [str(Path(sys.executable).parent / command[0]), *command[1:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf" in done.stderr
