"""The rules of the node role (docs/producer.md, "The node role" and "Commands"), each judged
from outside by the probe: what a gateway of any make must do to take part. A rule returns a
one-line account of what it saw, or raises RuleFailed with one of what went wrong (NotJudged when
it cannot be judged here); conformance/judge.py runs them in order."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from conntrack.conformance.probe import SECOND_NS, NotJudged, Probe, RuleFailed, Seen
from conntrack.core.commands import (
    FENCED_CLOSE_CODE,
    BroadcastFrame,
    CloseSocket,
    CloseSockets,
    DataType,
    FenceNotice,
    Outcome,
    OutcomeStatus,
    SendFrame,
)
from conntrack.core.events import (
    HEADERS,
    Activity,
    Cause,
    Connected,
    Disconnected,
    NodeHeartbeat,
    NodeStarted,
)

NO_SUCH_ID: Final = "conformance-no-such-connection"
# How long a frame that must not come is waited for.
QUIET_S: Final = 1.0


@dataclass
class Socket:
    client: ClientConnection
    connection_id: str


@dataclass
class State:
    """What the rules learn and share: the node's incarnation, the kit's open sockets."""

    incarnation: int = 0
    sockets: dict[str, Socket] = field(default_factory=dict)
    stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)


@dataclass(frozen=True)
class Rule:
    name: str
    needs: tuple[str, ...]
    check: Callable[[Probe, State], Awaitable[str]]


# -- helpers ------------------------------------------------------------------------------------


def _expect_status(outcome: Outcome, status: OutcomeStatus) -> None:
    if outcome.status is not status:
        detail = f" ({outcome.detail})" if outcome.detail else ""
        raise RuleFailed(f"the outcome is {outcome.status.name}{detail}, not {status.name}")


async def _received(socket: Socket, timeout_s: float) -> str | bytes:
    try:
        return await asyncio.wait_for(socket.client.recv(), timeout_s)
    except TimeoutError:
        raise RuleFailed(f"the client received nothing within {timeout_s:g} s") from None
    except ConnectionClosed as exc:
        raise RuleFailed(f"the socket was closed ({exc.rcvd}) instead of a frame") from None


async def _nothing_received(socket: Socket) -> None:
    with contextlib.suppress(TimeoutError):
        frame = await asyncio.wait_for(socket.client.recv(), QUIET_S)
        raise RuleFailed(f"the client received {frame!r}, which the node must not have sent")


async def _open(probe: Probe, state: State, name: str) -> Socket:
    """A new client and its Connected event, checked field by field."""
    since = time.monotonic()
    client, marker = await state.stack.enter_async_context(probe.socket())

    def its_connected(seen: Seen) -> bool:
        payload = seen.event.payload if seen.event is not None else None
        return isinstance(payload, Connected) and payload.user_agent == marker

    seen = await probe.event(
        f"Connected event of the socket (User-Agent {marker})", its_connected, since
    )
    assert seen.event is not None
    assert isinstance(seen.event.payload, Connected)
    event, connected = seen.event, seen.event.payload
    if connected.node_id != probe.node_id:
        raise RuleFailed(f"Connected names node {connected.node_id!r}, not {probe.node_id!r}")
    if state.incarnation and connected.node_incarnation != state.incarnation:
        raise RuleFailed(
            f"Connected names incarnation {connected.node_incarnation}, not the node's "
            f"{state.incarnation}"
        )
    if not connected.source_ip:
        raise RuleFailed("Connected has no source_ip")
    missing = [f"{k}: {v.decode()}" for k, v in HEADERS if seen.headers.get(k) != v]
    if missing:
        raise RuleFailed(f"the record lacks the headers {', '.join(missing)}")
    socket = Socket(client, event.connection_id)
    state.sockets[name] = socket
    return socket


async def _closed(socket: Socket, timeout_s: float) -> tuple[int | None, str | None]:
    try:
        await asyncio.wait_for(socket.client.wait_closed(), timeout_s)
    except TimeoutError:
        raise RuleFailed(f"the socket is still open after {timeout_s:g} s") from None
    return socket.client.close_code, socket.client.close_reason


async def _disconnected(probe: Probe, connection_id: str, since: float) -> Disconnected:
    seen = await probe.event(
        f"Disconnected event of {connection_id}",
        lambda s: (
            s.event is not None
            and s.event.connection_id == connection_id
            and isinstance(s.event.payload, Disconnected)
        ),
        since,
    )
    assert seen.event is not None
    assert isinstance(seen.event.payload, Disconnected)
    return seen.event.payload


def _node_event(
    kind: type[NodeStarted | NodeHeartbeat],
    node_id: str,
    *,
    incarnation: int | None = None,
    after: int | None = None,
) -> Callable[[Seen], bool]:
    """Matches the node's events of a kind: of one incarnation, or of one after a given one."""

    def match(seen: Seen) -> bool:
        payload = seen.event.payload if seen.event is not None else None
        return (
            isinstance(payload, kind)
            and payload.node_id == node_id
            and (incarnation is None or payload.incarnation == incarnation)
            and (after is None or payload.incarnation > after)
        )

    return match


def _incarnation(seen: Seen) -> int:
    payload = seen.event.payload if seen.event is not None else None
    assert isinstance(payload, NodeStarted | NodeHeartbeat)
    return payload.incarnation


# -- the rules ------------------------------------------------------------------------------


async def node_started(probe: Probe, state: State) -> str:
    await probe.event("NodeStarted event of the node", _node_event(NodeStarted, probe.node_id))
    await probe.caught_up_on_node()
    started = probe.events_of(_node_event(NodeStarted, probe.node_id))
    refused = probe.events_of(lambda s: s.event is None and s.key == probe.node_id.encode())
    if refused:
        raise RuleFailed(f"a record of the node is refused by the projector: {refused[-1].error}")
    state.incarnation = max(map(_incarnation, started))
    return f"incarnation {state.incarnation}"


async def heartbeat(probe: Probe, state: State) -> str:
    since = time.monotonic()
    seen = await probe.event(
        f"NodeHeartbeat of incarnation {state.incarnation}",
        _node_event(NodeHeartbeat, probe.node_id, incarnation=state.incarnation),
        since,
    )
    return f"after {seen.at - since:.1f} s"


async def connected(probe: Probe, state: State) -> str:
    socket = await _open(probe, state, "a")
    return (
        f"connection {socket.connection_id}, node {probe.node_id}, incarnation {state.incarnation}"
    )


async def activity(probe: Probe, state: State) -> str:
    socket = state.sockets["a"]
    since = time.monotonic()
    for n in range(3):
        await socket.client.send(f"conformance {n}")
    seen = await probe.event(
        f"Activity event of {socket.connection_id}",
        lambda s: (
            s.event is not None
            and s.event.connection_id == socket.connection_id
            and isinstance(s.event.payload, Activity)
        ),
        since,
    )
    assert seen.event is not None
    assert isinstance(seen.event.payload, Activity)
    return f"{seen.event.payload.frames} frame(s) in the first Activity"


async def send_text(probe: Probe, state: State) -> str:
    socket, text = state.sockets["a"], "conformance: text ✓ ü"
    command_id = await probe.command(
        SendFrame(text.encode(), DataType.TEXT),
        incarnation=state.incarnation,
        connection_id=socket.connection_id,
    )
    frame = await _received(socket, probe.timeout_s)
    if frame != text:
        raise RuleFailed(f"the client received {frame!r}, not the text frame {text!r}")
    _expect_status(await probe.outcome(command_id), OutcomeStatus.DONE)
    return "the text frame arrived as sent, outcome DONE"


async def send_binary(probe: Probe, state: State) -> str:
    socket, data = state.sockets["a"], bytes(range(256)) * 4
    command_id = await probe.command(
        SendFrame(data, DataType.BINARY),
        incarnation=state.incarnation,
        connection_id=socket.connection_id,
    )
    frame = await _received(socket, probe.timeout_s)
    if frame != data:
        raise RuleFailed(f"the client received {frame[:16]!r}..., not the {len(data)} bytes sent")
    _expect_status(await probe.outcome(command_id), OutcomeStatus.DONE)
    return f"{len(data)} bytes arrived as sent, outcome DONE"


async def unknown_connection(probe: Probe, state: State) -> str:
    command_id = await probe.command(
        SendFrame(b"x", DataType.TEXT), incarnation=state.incarnation, connection_id=NO_SUCH_ID
    )
    _expect_status(await probe.outcome(command_id), OutcomeStatus.CONNECTION_GONE)
    return "outcome CONNECTION_GONE"


async def older_incarnation(probe: Probe, state: State) -> str:
    if state.incarnation <= 1:
        raise NotJudged("the node is at incarnation 1: there is no older one")
    socket = state.sockets["a"]
    command_id = await probe.command(
        SendFrame(b"from an older incarnation", DataType.TEXT),
        incarnation=state.incarnation - 1,
        connection_id=socket.connection_id,
    )
    _expect_status(await probe.outcome(command_id), OutcomeStatus.CONNECTION_GONE)
    await _nothing_received(socket)
    return "not executed, outcome CONNECTION_GONE"


async def expired(probe: Probe, state: State) -> str:
    socket = state.sockets["a"]
    command_id = await probe.command(
        SendFrame(b"too late", DataType.TEXT),
        incarnation=state.incarnation,
        connection_id=socket.connection_id,
        expires_at_ns=time.time_ns() - SECOND_NS,
    )
    _expect_status(await probe.outcome(command_id), OutcomeStatus.EXPIRED)
    await _nothing_received(socket)
    return "not executed, outcome EXPIRED"


async def duplicate(probe: Probe, state: State) -> str:
    socket = state.sockets["a"]
    action = SendFrame(b"once", DataType.TEXT)
    command_id = await probe.command(
        action, incarnation=state.incarnation, connection_id=socket.connection_id
    )
    await probe.outcome(command_id)
    await probe.command(
        action,
        incarnation=state.incarnation,
        connection_id=socket.connection_id,
        command_id=command_id,
    )
    first, again = await probe.outcomes(command_id, 2)
    if await _received(socket, probe.timeout_s) != "once":
        raise RuleFailed("the client did not receive the frame")
    await _nothing_received(socket)
    _expect_status(first, OutcomeStatus.DONE)
    if again.status is not first.status:
        raise RuleFailed(
            f"the repeat was answered {again.status.name}, the first {first.status.name}"
        )
    return "executed once, both answered DONE"


async def broadcast(probe: Probe, state: State) -> str:
    a, b = state.sockets["a"], await _open(probe, state, "b")
    ids = (a.connection_id, b.connection_id, NO_SUCH_ID)
    command_id = await probe.command(
        BroadcastFrame(b"to all", DataType.TEXT, ids), incarnation=state.incarnation
    )
    for socket in (a, b):
        if await _received(socket, probe.timeout_s) != "to all":
            raise RuleFailed(f"{socket.connection_id} did not receive the broadcast frame")
    outcome = await probe.outcome(command_id)
    _expect_status(outcome, OutcomeStatus.DONE)
    if (outcome.delivered, outcome.gone_ids) != (2, (NO_SUCH_ID,)):
        raise RuleFailed(
            f"the outcome says delivered={outcome.delivered} gone_ids={list(outcome.gone_ids)}, "
            f"not 2 and [{NO_SUCH_ID!r}]"
        )
    return "both sockets got the frame; delivered 2, the unknown id gone"


async def disconnect(probe: Probe, state: State) -> str:
    socket, since = state.sockets.pop("a"), time.monotonic()
    command_id = await probe.command(
        CloseSocket(4001, "conformance"),
        incarnation=state.incarnation,
        connection_id=socket.connection_id,
    )
    code, reason = await _closed(socket, probe.timeout_s)
    if (code, reason) != (4001, "conformance"):
        raise RuleFailed(f"the socket was closed with {code} {reason!r}, not 4001 'conformance'")
    _expect_status(await probe.outcome(command_id), OutcomeStatus.DONE)
    ended = await _disconnected(probe, socket.connection_id, since)
    if (ended.status_code, ended.reason) != (4001, "conformance"):
        raise RuleFailed(f"Disconnected says {ended.status_code} {ended.reason!r}")
    if ended.cause not in (Cause.DISCONNECTED_BY_API, Cause.UNSPECIFIED):
        raise RuleFailed(f"Disconnected's cause is {ended.cause}, not DISCONNECTED_BY_API")
    return "closed with 4001 'conformance'; Disconnected told it"


async def disconnect_many(probe: Probe, state: State) -> str:
    c, d, since = await _open(probe, state, "c"), await _open(probe, state, "d"), time.monotonic()
    ids = (c.connection_id, d.connection_id, NO_SUCH_ID)
    command_id = await probe.command(CloseSockets(4002, "many", ids), incarnation=state.incarnation)
    for socket in (c, d):
        code, _ = await _closed(socket, probe.timeout_s)
        if code != 4002:
            raise RuleFailed(f"{socket.connection_id} was closed with {code}, not 4002")
        await _disconnected(probe, socket.connection_id, since)
    outcome = await probe.outcome(command_id)
    _expect_status(outcome, OutcomeStatus.DONE)
    if outcome.gone_ids != (NO_SUCH_ID,):
        raise RuleFailed(f"gone_ids is {list(outcome.gone_ids)}, not [{NO_SUCH_ID!r}]")
    return "both sockets closed with 4002, the unknown id gone"


async def client_close(probe: Probe, state: State) -> str:
    socket, since = state.sockets.pop("b"), time.monotonic()
    await socket.client.close(1000, "bye")
    ended = await _disconnected(probe, socket.connection_id, since)
    if ended.status_code != 1000:
        raise RuleFailed(f"Disconnected says {ended.status_code}, not the client's 1000")
    if ended.cause not in (Cause.CLIENT_CLOSED, Cause.UNSPECIFIED):
        raise RuleFailed(f"Disconnected's cause is {ended.cause}, not CLIENT_CLOSED")
    return "Disconnected with the client's 1000"


async def fencing(probe: Probe, state: State) -> str:
    socket, since = await _open(probe, state, "e"), time.monotonic()
    command_id = await probe.command(FenceNotice(), incarnation=state.incarnation)
    code, _ = await _closed(socket, probe.timeout_s)
    if code != FENCED_CLOSE_CODE:
        raise RuleFailed(f"the fenced socket was closed with {code}, not {FENCED_CLOSE_CODE}")
    _expect_status(await probe.outcome(command_id), OutcomeStatus.DONE)
    seen = await probe.event(
        f"NodeStarted of an incarnation after {state.incarnation}",
        _node_event(NodeStarted, probe.node_id, after=state.incarnation),
        since,
    )
    state.incarnation = _incarnation(seen)
    return f"sockets closed with {FENCED_CLOSE_CODE}, new incarnation {state.incarnation}"


async def restart(probe: Probe, state: State) -> str:
    if not probe.restart_command:
        raise NotJudged("give --restart-command to judge it")
    socket, since = await _open(probe, state, "r"), time.monotonic()
    state.sockets.pop("r")
    done = await asyncio.create_subprocess_shell(probe.restart_command)
    try:
        code = await asyncio.wait_for(done.wait(), probe.timeout_s)
    except TimeoutError:
        done.kill()
        raise NotJudged(f"the restart command ran for over {probe.timeout_s:g} s") from None
    if code != 0:
        raise NotJudged(f"the restart command exited {code}")
    seen = await probe.event(
        f"NodeStarted of an incarnation after {state.incarnation}",
        _node_event(NodeStarted, probe.node_id, after=state.incarnation),
        since,
    )
    state.incarnation = _incarnation(seen)
    await _closed(socket, probe.timeout_s)
    deadline = time.monotonic() + probe.timeout_s
    while True:  # refused until the new process listens
        try:
            await _open(probe, state, "r")
            break
        except RuleFailed:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    return f"new incarnation {state.incarnation}; a new socket is of it"


RULES: Final = (
    Rule("node-started", (), node_started),
    Rule("heartbeat", ("node-started",), heartbeat),
    Rule("connected", ("node-started",), connected),
    Rule("activity", ("connected",), activity),
    Rule("send-text", ("connected",), send_text),
    Rule("send-binary", ("connected",), send_binary),
    Rule("unknown-connection", ("node-started",), unknown_connection),
    Rule("older-incarnation", ("connected",), older_incarnation),
    Rule("expired", ("connected",), expired),
    Rule("duplicate", ("connected",), duplicate),
    Rule("broadcast", ("connected",), broadcast),
    Rule("disconnect", ("connected",), disconnect),
    Rule("disconnect-many", ("node-started",), disconnect_many),
    Rule("client-close", ("broadcast",), client_close),
    Rule("fencing", ("node-started",), fencing),
    Rule("restart", ("node-started",), restart),
)
