"""lifecycle/records.py and the webhook's body: what the official CloudEvents SDK reads from
them (the Kafka protocol binding's binary mode, the HTTP binding's structured mode), and the
fence's records as the projector and a node decode them."""

from __future__ import annotations

import hashlib
import hmac
import json

from cloudevents.http import from_http
from cloudevents.kafka import KafkaMessage, from_binary

from conntrack.core.commands import FenceNotice, decode_command
from conntrack.core.events import NodeFenced, decode_record
from conntrack.lifecycle.records import (
    decode_lifecycle,
    fence_event_record,
    fence_notice_record,
    lifecycle_record,
)
from conntrack.lifecycle.telling import Fence, Reason, Told
from conntrack.lifecycle.webhook import CONTENT_TYPE, cloud_event_body, signature

AT = 1_764_300_000_123_456_789
OPENED = Told(
    "opened",
    "c-1",
    "gw-1",
    "node-7",
    42,
    AT,
    principal="alice",
    labels=(("tier", "gold"),),
    source_ip="203.0.113.7",
    user_agent="ua/1",
)
CLOSED = Told(
    "closed",
    "c-1",
    "gw-1",
    "node-7",
    42,
    AT + 5,
    reason=Reason.CLIENT_CLOSED,
    status_code=4001,
    reason_text="bye",
)


def test_the_kafka_binding_is_what_the_cloudevents_sdk_reads() -> None:
    for told, kind in ((OPENED, "opened"), (CLOSED, "closed")):
        record = lifecycle_record(told)
        assert record.key == b"c-1"
        message = KafkaMessage(headers=dict(record.headers), key=record.key, value=record.value)
        event = from_binary(message, data_unmarshaller=lambda b: b)
        assert event["specversion"] == "1.0"
        assert event["type"] == f"dev.conntrack.connection.{kind}.v1"
        assert event["id"] == f"c-1/{kind}"
        assert event["source"] == "/conntrack/gateways/gw-1"
        assert event["subject"] == "c-1"
        assert event["datacontenttype"] == "application/x-protobuf"
        assert event["time"] == f"2025-11-28T03:20:00.{123456789 + told.at_ns - AT}Z"
        data = decode_lifecycle(event.data)
        assert (data.connection_id, data.node_id, data.node_incarnation) == ("c-1", "node-7", 42)
    opened = decode_lifecycle(lifecycle_record(OPENED).value)
    assert (opened.opened.principal, dict(opened.opened.labels)) == ("alice", {"tier": "gold"})
    closed = decode_lifecycle(lifecycle_record(CLOSED).value)
    assert (closed.closed.reason, closed.closed.status_code, closed.closed.reason_text) == (
        Reason.CLIENT_CLOSED,
        4001,
        "bye",
    )


def test_the_webhook_body_is_a_structured_cloud_event_and_its_signature_an_hmac() -> None:
    record = lifecycle_record(CLOSED)
    body = cloud_event_body(record.headers, record.value)
    event = from_http({"content-type": CONTENT_TYPE}, body)
    assert event["type"] == "dev.conntrack.connection.closed.v1"
    assert event["id"] == "c-1/closed"
    assert event.data["closed"] == {
        "reason": "CLIENT_CLOSED",
        "status_code": 4001,
        "reason_text": "bye",
    }
    assert json.loads(body)["datacontenttype"] == "application/json"
    expected = "sha256=" + hmac.new(b"k", body, hashlib.sha256).hexdigest()
    assert signature(b"k", body) == expected
    assert signature(b"other", body) != expected


def test_a_fence_is_a_node_fenced_event_and_a_fenced_command_the_same_each_time() -> None:
    fence = Fence("node-7", 42, "gw-1", AT)
    event_record = fence_event_record(fence)
    event = decode_record(event_record.value, event_record.key)
    assert event.payload == NodeFenced("node-7", 42)
    assert (event.gateway_id, event.occurred_at_ns, event.connection_id) == ("gw-1", AT, "")
    assert fence_event_record(fence).value == event_record.value  # the same id when repeated
    notice = fence_notice_record(fence, "conntrack-lifecycle")
    command = decode_command(notice.value, notice.key)
    assert isinstance(command.action, FenceNotice)
    assert (command.node_id, command.node_incarnation, command.connection_id) == ("node-7", 42, "")
    assert command.expires_at_ns > AT
    assert fence_notice_record(fence, "conntrack-lifecycle").value == notice.value
