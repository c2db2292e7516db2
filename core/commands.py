"""The command channel's messages and their codec (proto/conntrack/commands/v1/commands.proto):
what the API asks the gateway node holding a socket to do (Command: write a frame, close the
socket, write one frame to each of a list of its sockets) and what the node answers (Outcome).
The API writes commands and reads outcomes; a node reads commands and writes outcomes; both go
through this module, and decoding turns anything unusable into InvalidCommand with a reason."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from conntrack.core.ids import id_problem, is_valid_id
from conntrack.core.protogen.conntrack.commands.v1 import commands_pb2 as pb
from conntrack.core.settings import default
from conntrack.core.timeutil import NANOS_PER_SECOND, to_timestamp

SCHEMA_VERSION: Final = 1
# Upstream's limit on Send's data (and so the largest frame a command carries).
MAX_SEND_BYTES: Final = 131_072
NORMAL_CLOSURE: Final = 1000
# Connection ids in one broadcast command: with ids of MAX_ID_LENGTH and the largest frame the
# command stays below Kafka's default 1 MB message limit (api/application/broadcast.py also bounds
# bytes).
MAX_BROADCAST_IDS: Final = 1000
# A fetch of commands (a node) or of outcomes (the API) is answered once this much is there or
# the fetch wait (settings.commands_fetch_wait_ms) has passed: at 1,000 commands/s of ~200
# bytes the wait decides, above ~20,000/s the bytes do.
FETCH_MIN_BYTES: Final = 4096


@dataclass(frozen=True)
class Batching:
    """Kafka's batching at either end of the channel: the producers' linger and the consumers'
    fetch wait (the settings commands_linger_ms and commands_fetch_wait_ms)."""

    linger_ms: int
    fetch_wait_ms: int

    @classmethod
    def of(cls, linger_ms: int | None = None, fetch_wait_ms: int | None = None) -> Batching:
        """The values given, the settings' defaults for those that are None."""
        return cls(
            int(default("commands_linger_ms") if linger_ms is None else linger_ms),
            int(default("commands_fetch_wait_ms") if fetch_wait_ms is None else fetch_wait_ms),
        )

    def consumer_options(self) -> dict[str, int]:
        """0: no batching, answered at the first record (Kafka's defaults; a wait of 0 would
        have an idle consumer spin)."""
        if self.fetch_wait_ms <= 0:
            return {"fetch_min_bytes": 1, "fetch_max_wait_ms": 500}
        return {"fetch_min_bytes": FETCH_MIN_BYTES, "fetch_max_wait_ms": self.fetch_wait_ms}


class DataType(IntEnum):
    BINARY = pb.Send.BINARY
    TEXT = pb.Send.TEXT


@dataclass(frozen=True, slots=True)
class SendFrame:
    data: bytes
    type: DataType


@dataclass(frozen=True, slots=True)
class CloseSocket:
    status_code: int = NORMAL_CLOSURE
    reason: str = ""


@dataclass(frozen=True, slots=True)
class BroadcastFrame:
    """The same frame to each of these sockets of the node (command's connection_id is "")."""

    data: bytes
    type: DataType
    connection_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CloseSockets:
    """Close each of these sockets of the node (command's connection_id is "")."""

    status_code: int
    reason: str
    connection_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class FenceNotice:
    """The node's incarnations up to the command's node_incarnation are fenced (connection_id
    is ""): start a new incarnation and close their sockets (commands.proto, Fenced)."""


# The WebSocket close code of a fenced incarnation's sockets: service restart, so the clients
# connect again.
FENCED_CLOSE_CODE: Final = 1012

ManySockets = BroadcastFrame | CloseSockets
Action = SendFrame | CloseSocket | BroadcastFrame | CloseSockets | FenceNotice


@dataclass(frozen=True, slots=True)
class Command:
    command_id: str
    node_id: str
    node_incarnation: int
    connection_id: str
    issued_at_ns: int
    expires_at_ns: int  # the caller's deadline: not executed after it
    reply_to: str  # key of the outcome record
    action: Action


class OutcomeStatus(IntEnum):
    DONE = pb.CommandOutcome.DONE
    CONNECTION_GONE = pb.CommandOutcome.CONNECTION_GONE
    EXPIRED = pb.CommandOutcome.EXPIRED
    FAILED = pb.CommandOutcome.FAILED


@dataclass(frozen=True, slots=True)
class Outcome:
    command_id: str
    node_id: str
    node_incarnation: int
    completed_at_ns: int
    status: OutcomeStatus
    detail: str = ""
    # Broadcast: sockets the frame was written to, and ids the node did not hold.
    delivered: int = 0
    gone: int = 0
    # Broadcast and CloseSockets: the ids the node did not hold, failed on, or (FAILED at the
    # deadline) had not reached; every other id of the command was done.
    gone_ids: tuple[str, ...] = ()
    failed_ids: tuple[str, ...] = ()
    unreached_ids: tuple[str, ...] = ()


class InvalidCommand(ValueError):
    """A record that is not a valid command or outcome; the message says why."""


def _ns(ts: Timestamp) -> int:
    return ts.seconds * NANOS_PER_SECOND + ts.nanos


def encode_command(command: Command) -> bytes:
    msg = pb.Command(
        schema_version=SCHEMA_VERSION,
        command_id=command.command_id,
        node_id=command.node_id,
        node_incarnation=command.node_incarnation,
        connection_id=command.connection_id,
        issued_at=to_timestamp(command.issued_at_ns),
        expires_at=to_timestamp(command.expires_at_ns),
        reply_to=command.reply_to,
    )
    action = command.action
    if isinstance(action, SendFrame):
        msg.send.data = action.data
        msg.send.type = int(action.type)  # type: ignore[assignment]
    elif isinstance(action, BroadcastFrame):
        msg.broadcast.data = action.data
        msg.broadcast.type = int(action.type)  # type: ignore[assignment]
        msg.broadcast.connection_ids.extend(action.connection_ids)
    elif isinstance(action, CloseSockets):
        msg.disconnect_many.status_code = action.status_code
        msg.disconnect_many.reason = action.reason
        msg.disconnect_many.connection_ids.extend(action.connection_ids)
    elif isinstance(action, FenceNotice):
        msg.fenced.SetInParent()
    else:
        msg.disconnect.status_code = action.status_code
        msg.disconnect.reason = action.reason
    return msg.SerializeToString()


def decode_command(value: bytes | None, key: bytes | None = None) -> Command:
    """Decode and check one record of the commands topic (key: the node id)."""
    if value is None:
        raise InvalidCommand("record has no value")
    try:
        msg = pb.Command.FromString(value)
    except (DecodeError, RecursionError) as exc:
        raise InvalidCommand(f"not a Command protobuf: {exc}") from None
    if msg.schema_version != SCHEMA_VERSION:
        raise InvalidCommand(f"schema_version {msg.schema_version} is not {SCHEMA_VERSION}")
    which = msg.WhichOneof("action")
    # A broadcast names its sockets in the action, not in connection_id.
    names = ("command_id", "node_id", "reply_to")
    many = which in ("broadcast", "disconnect_many", "fenced")
    for name in names if many else (*names, "connection_id"):
        problem = id_problem(name, getattr(msg, name))
        if problem is not None:
            raise InvalidCommand(problem)
    if key is not None and key != msg.node_id.encode():
        raise InvalidCommand("record key does not equal node_id")
    action: Action
    if which == "send":
        if msg.send.type not in (pb.Send.BINARY, pb.Send.TEXT):
            raise InvalidCommand("send.type is neither BINARY nor TEXT")
        if len(msg.send.data) > MAX_SEND_BYTES:
            raise InvalidCommand(f"send.data is longer than {MAX_SEND_BYTES} bytes")
        action = SendFrame(msg.send.data, DataType(msg.send.type))
    elif which == "disconnect":
        action = CloseSocket(msg.disconnect.status_code or NORMAL_CLOSURE, msg.disconnect.reason)
    elif which == "broadcast":
        action = _broadcast_frame(msg.broadcast)
    elif which == "disconnect_many":
        many_msg = msg.disconnect_many
        action = CloseSockets(
            many_msg.status_code or NORMAL_CLOSURE,
            many_msg.reason,
            _target_ids("disconnect_many", many_msg.connection_ids),
        )
    elif which == "fenced":
        action = FenceNotice()
    else:
        raise InvalidCommand("action is missing or unknown")
    return Command(
        msg.command_id,
        msg.node_id,
        msg.node_incarnation,
        msg.connection_id,
        _ns(msg.issued_at),
        _ns(msg.expires_at),
        msg.reply_to,
        action,
    )


def _broadcast_frame(msg: pb.Broadcast) -> BroadcastFrame:
    if msg.type not in (pb.Send.BINARY, pb.Send.TEXT):
        raise InvalidCommand("broadcast.type is neither BINARY nor TEXT")
    if len(msg.data) > MAX_SEND_BYTES:
        raise InvalidCommand(f"broadcast.data is longer than {MAX_SEND_BYTES} bytes")
    return BroadcastFrame(
        msg.data, DataType(msg.type), _target_ids("broadcast", msg.connection_ids)
    )


def _target_ids(action: str, connection_ids: Iterable[str]) -> tuple[str, ...]:
    ids = tuple(connection_ids)
    if not ids or len(ids) > MAX_BROADCAST_IDS:
        raise InvalidCommand(f"{action}.connection_ids must hold 1 to {MAX_BROADCAST_IDS} ids")
    if not all(is_valid_id(i) for i in ids):
        raise InvalidCommand(f"{action}.connection_ids holds an empty, too long or NUL id")
    if len(set(ids)) != len(ids):
        raise InvalidCommand(f"{action}.connection_ids holds an id twice")
    return ids


def encode_outcome(outcome: Outcome) -> bytes:
    return pb.CommandOutcome(
        schema_version=SCHEMA_VERSION,
        command_id=outcome.command_id,
        node_id=outcome.node_id,
        node_incarnation=outcome.node_incarnation,
        completed_at=to_timestamp(outcome.completed_at_ns),
        status=int(outcome.status),  # type: ignore[arg-type]
        detail=outcome.detail,
        delivered=outcome.delivered,
        gone=outcome.gone,
        gone_ids=outcome.gone_ids,
        failed_ids=outcome.failed_ids,
        unreached_ids=outcome.unreached_ids,
    ).SerializeToString()


def decode_outcome(value: bytes | None) -> Outcome:
    if value is None:
        raise InvalidCommand("record has no value")
    try:
        msg = pb.CommandOutcome.FromString(value)
    except (DecodeError, RecursionError) as exc:
        raise InvalidCommand(f"not a CommandOutcome protobuf: {exc}") from None
    if not msg.command_id:
        raise InvalidCommand("command_id is missing")
    try:
        status = OutcomeStatus(msg.status)
    except ValueError:
        raise InvalidCommand(f"status {msg.status} is unknown") from None
    return Outcome(
        msg.command_id,
        msg.node_id,
        msg.node_incarnation,
        _ns(msg.completed_at),
        status,
        msg.detail,
        msg.delivered,
        msg.gone,
        tuple(msg.gone_ids),
        tuple(msg.failed_ids),
        tuple(msg.unreached_ids),
    )
