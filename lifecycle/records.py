"""What the lifecycle role writes to Kafka, as records: the lifecycle topic's events (protobuf,
with the CloudEvents Kafka binding's headers), the NodeFenced events of its fences, and the
fence notices to the fenced nodes (proto/conntrack/lifecycle/v1/lifecycle.proto,
events.proto, commands.proto)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Final

from conntrack.core.commands import Command, FenceNotice, encode_command
from conntrack.core.events import HEADERS, Event, NodeFenced, encode, record_key
from conntrack.core.protogen.conntrack.lifecycle.v1 import lifecycle_pb2 as pb
from conntrack.core.timeutil import NANOS_PER_SECOND, format_rfc3339, to_timestamp
from conntrack.lifecycle.telling import Fence, Told

SCHEMA_VERSION: Final = 1
CONTENT_TYPE: Final = "application/x-protobuf"
# ce_type of each kind; a breaking change of the payload gets a new version suffix.
TYPES: Final = {
    "opened": "dev.conntrack.connection.opened.v1",
    "closed": "dev.conntrack.connection.closed.v1",
}
# Namespace of the ids of the fences' records (uuid5 of what is fenced: the same every time the
# same fence is published again).
_ID_NAMESPACE: Final = uuid.UUID("6c1f0f0e-3b1a-5d8e-9a57-2f4c1e0b7d21")
# How long a fence notice may wait for its node: long enough for any stall the node could
# come back from.
FENCE_NOTICE_TTL_NS: Final = 7 * 24 * 3600 * NANOS_PER_SECOND


@dataclass(frozen=True, slots=True)
class Record:
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


def event_id(kind: str, connection_id: str) -> str:
    """The id of what is told of a connection, `<connection_id>/<kind>`: unique within its source
    (a gateway), the same every time the same thing is told (a consumer deduplicates by it)."""
    return f"{connection_id}/{kind}"


def lifecycle_record(told: Told) -> Record:
    msg = pb.LifecycleEvent(
        schema_version=SCHEMA_VERSION,
        event_id=event_id(told.kind, told.connection_id),
        connection_id=told.connection_id,
        gateway_id=told.gateway_id,
        node_id=told.node_id,
        node_incarnation=told.incarnation,
        occurred_at=to_timestamp(told.at_ns),
    )
    if told.kind == "opened":
        msg.opened.principal = told.principal
        msg.opened.labels.update(told.labels)
        msg.opened.source_ip = told.source_ip
        msg.opened.user_agent = told.user_agent
    else:
        msg.closed.reason = told.reason  # type: ignore[assignment]
        msg.closed.status_code = told.status_code
        msg.closed.reason_text = told.reason_text
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", msg.event_id.encode()),
        ("ce_type", TYPES[told.kind].encode()),
        ("ce_source", f"/conntrack/gateways/{told.gateway_id}".encode()),
        ("ce_subject", told.connection_id.encode()),
        ("ce_time", format_rfc3339(told.at_ns).encode()),
        ("content-type", CONTENT_TYPE.encode()),
    ]
    return Record(told.connection_id.encode(), msg.SerializeToString(), headers)


def fence_event_record(fence: Fence) -> Record:
    """The NodeFenced event of a fence, for the events topic (keyed by the node, so it is on the
    node's partition, after everything the node said before it)."""
    event = Event(
        str(uuid.uuid5(_ID_NAMESPACE, f"fence:{fence.node_id}:{fence.incarnation}")),
        "",
        fence.gateway_id,
        fence.at_ns,
        NodeFenced(fence.node_id, fence.incarnation),
    )
    return Record(record_key(event), encode(event), list(HEADERS))


def fence_notice_record(fence: Fence, reply_to: str) -> Record:
    """The command that tells the fenced node (commands.proto, Fenced)."""
    command = Command(
        command_id=str(uuid.uuid5(_ID_NAMESPACE, f"notice:{fence.node_id}:{fence.incarnation}")),
        node_id=fence.node_id,
        node_incarnation=fence.incarnation,
        connection_id="",
        issued_at_ns=fence.at_ns,
        expires_at_ns=fence.at_ns + FENCE_NOTICE_TTL_NS,
        reply_to=reply_to,
        action=FenceNotice(),
    )
    return Record(fence.node_id.encode(), encode_command(command), [])


def decode_lifecycle(value: bytes) -> pb.LifecycleEvent:
    """A lifecycle record's value (for consumers and tests)."""
    return pb.LifecycleEvent.FromString(value)
