"""A Send is one trace from the API call to the socket write and back, across three processes
and Kafka, exported over OTLP to a real OpenTelemetry Collector (tests/support/otel.py): the API's
server span, the command's PRODUCER span, the node's CONSUMER span, its socket write, the
outcome's PRODUCER span and the API's CONSUMER span of the outcome. The projector's batch is
linked to the trace of the Connected event it applied, and the database calls are spans too."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from websockets.asyncio.client import connect

from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2_grpc as svc_grpc,
)
from conntrack.core.settings import Settings
from tests.support.api import serve_api
from tests.support.gateway import (
    GatewayProcess,
    own_id,
    send_request,
    wait_for_get,
    with_command_topics,
)
from tests.support.kafka import unique
from tests.support.otel import (
    CLIENT,
    CONSUMER,
    PRODUCER,
    SERVER,
    Collector,
    ExportedSpan,
    running_collector,
)
from tests.support.ports import free_port
from tests.support.projector import ProjectorProcess

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]


def _status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return int(answer.status)


def _one(spans: list[ExportedSpan], **want: object) -> ExportedSpan:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in want.items())]
    assert len(found) == 1, (want, [(s.service, s.name, s.kind) for s in spans])
    return found[0]


async def _spans_until(
    collector: Collector, ready: Callable[[list[ExportedSpan]], bool], within: float = 30
) -> list[ExportedSpan]:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        spans = collector.spans()
        if ready(spans):
            return spans
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(
                f"spans so far: {[(s.service, s.name) for s in spans]}\n{collector.log()}"
            )
        await asyncio.sleep(0.3)


@pytest.mark.parametrize("backend", ["postgres"])
async def test_a_send_is_one_trace_from_the_call_to_the_socket_and_back(
    kafka_settings: Settings,
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with running_collector(tmp_path) as collector:
        # The processes below inherit these: the usual OpenTelemetry configuration.
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
        async with with_command_topics(kafka_settings) as settings:
            projector = ProjectorProcess(settings, database_url, tmp_path / "projector.log")
            port, rest_port = free_port(), free_port()
            api = await serve_api(
                database_url,
                port,
                tmp_path / "api.log",
                kafka_bootstrap_servers=settings.kafka_bootstrap_servers,
                events_topic=settings.events_topic,
                commands_topic=settings.commands_topic,
                command_outcomes_topic=settings.command_outcomes_topic,
                api_workers="1",
                api_rest_port=str(rest_port),
            )
            gateway = GatewayProcess(settings, unique("node"), tmp_path / "gateway.log")
            try:
                url = await gateway.start()
                async with (
                    grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
                    connect(url) as client,
                ):
                    stub = svc_grpc.ConnectionServiceStub(channel)
                    connection_id = own_id(client)
                    await wait_for_get(stub, connection_id, "OK")
                    await stub.Send(send_request(connection_id, b"traced"), timeout=30)
                    assert await asyncio.wait_for(client.recv(), 10) == "traced"
                    rest = f"http://127.0.0.1:{rest_port}{_REST_GET}{connection_id}"
                    assert await asyncio.to_thread(_status, rest) == 200
            finally:
                assert await gateway.terminate() == 0, gateway.log()
                api.terminate()
                assert await api.wait() == 0, (tmp_path / "api.log").read_text()
                assert await projector.terminate() == 0, projector.log()

        def complete(spans: list[ExportedSpan]) -> bool:
            names = {(s.service, s.name) for s in spans}
            return {
                ("conntrack-api", f"process {settings.command_outcomes_topic}"),
                ("conntrack-projector", f"process {settings.events_topic}"),
                ("conntrack-gateway", f"send {settings.command_outcomes_topic}"),
            } <= names and any(n.startswith("GET") for _, n in names)

        spans = await _spans_until(collector, complete)
        for log in ("api.log", "gateway.log", "projector.log"):
            text = (tmp_path / log).read_text()
            assert "event=tracing_on" in text, text
            assert " ERROR " not in text, text
            assert "Traceback" not in text, text

    send = _one(spans, service="conntrack-api", kind=SERVER, name=_SEND)
    trace = [s for s in spans if s.trace_id == send.trace_id]
    by_id = {s.span_id: s for s in trace}

    def parent(span: ExportedSpan) -> ExportedSpan:
        assert span.parent_id in by_id, (span, trace)
        return by_id[span.parent_id]

    command = _one(trace, kind=PRODUCER, name=f"send {settings.commands_topic}")
    executed = _one(trace, kind=CONSUMER, name=f"process {settings.commands_topic}")
    written = _one(trace, name="websocket send")
    outcome = _one(trace, kind=PRODUCER, name=f"send {settings.command_outcomes_topic}")
    answered = _one(trace, kind=CONSUMER, name=f"process {settings.command_outcomes_topic}")
    assert (command.service, parent(command)) == ("conntrack-api", send)
    assert (executed.service, parent(executed)) == ("conntrack-gateway", command)
    assert (written.service, parent(written)) == ("conntrack-gateway", executed)
    assert (outcome.service, parent(outcome)) == ("conntrack-gateway", executed)
    assert (answered.service, parent(answered)) == ("conntrack-api", outcome)

    # Get read the read model: its database statements are its children.
    gets = {s.span_id for s in spans if s.service == "conntrack-api" and s.name == _GET}
    assert gets
    assert any(s.kind == CLIENT and s.parent_id in gets for s in spans)

    # The REST mapping is traced as well, the same way.
    assert any(
        s.service == "conntrack-api" and s.kind == SERVER and s.name.startswith("GET")
        for s in spans
    ), sorted({(s.name, s.kind) for s in spans if s.service == "conntrack-api"})

    # The projector's batch that applied the Connected is linked to the socket's trace.
    opened = _one(spans, service="conntrack-gateway", name="websocket open")
    published = _one(
        [s for s in spans if s.trace_id == opened.trace_id],
        kind=PRODUCER,
        name=f"send {settings.events_topic}",
    )
    batches = [
        s
        for s in spans
        if s.service == "conntrack-projector" and s.name == f"process {settings.events_topic}"
    ]
    assert any((published.trace_id, published.span_id) in b.links for b in batches), batches
    batch_ids = {b.span_id for b in batches}
    assert any(
        s.service == "conntrack-projector" and s.parent_id in batch_ids and s.kind == CLIENT
        for s in spans
    ), "the batch's database statements are its children"


_SEND = "/yandex.cloud.serverless.apigateway.websocket.v1.ConnectionService/Send"
_GET = "/yandex.cloud.serverless.apigateway.websocket.v1.ConnectionService/Get"
_REST_GET = "/apigateways/websocket/v1/connections/"
