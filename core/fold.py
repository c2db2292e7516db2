"""The fold: a pure function from (state, event) to state. No I/O lives here.

The state of a connection is a join-semilattice: every field is chosen by a total order over
events, so applying the same events in any order, any number of times, in any batch split,
gives the same state (property-tested in tests/unit/test_fold.py):

- gateway, identity, node, principal, labels and connected_at come from the Connected event
  that sorts first by (occurred_at, event_id, then its contents): a retried or duplicated
  Connected cannot move them;
- last_active_at is the latest event time of any kind;
- disconnected_at, status and reason come from the first Disconnected by the same order.

Ties on (occurred_at, event_id) are broken by the event's contents, so even two different
events that (wrongly) share an id fold to the same state in every order.

Because merge() is associative, commutative and idempotent, a batch can be folded on its own
and then merged into the stored row; the store needs no knowledge of events.

fold() is the projector's hot path, so it does not apply() event after event (each step would
build a new state): it reads each connection's events once, keeps the winning
Connected and Disconnected by the same order and the latest time, and builds one state per
connection at the end. tests/unit/test_fold.py checks it equals the event-by-event apply() on
random batches full of ties and duplicates.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from conntrack.core.events import (
    NODE_PAYLOADS,
    Activity,
    Connected,
    Disconnected,
    Event,
    EventTuple,
    NodeFenced,
    NodePayload,
    NodeStarted,
)
from conntrack.core.labels import to_json


class ConnectionState(NamedTuple):
    """A connection's folded state, also the read model's row (core/store.py).

    A named tuple rather than a frozen dataclass: the fold builds one per connection per batch
    and the store binds them column by column, and a tuple is several times cheaper to build
    and to transpose (zip(*states)); it is just as immutable."""

    connection_id: str
    gateway_id: str | None = None
    source_ip: str | None = None
    user_agent: str | None = None
    connected_at_ns: int | None = None
    connected_event_id: str | None = None
    last_active_at_ns: int | None = None
    disconnected_at_ns: int | None = None
    disconnect_status_code: int | None = None
    disconnect_reason: str | None = None
    disconnected_event_id: str | None = None
    # The gateway node holding the socket, from the winning Connected (None: no node role).
    node_id: str | None = None
    node_incarnation: int | None = None
    # Who the connection is for and its labels as canonical JSON (core/labels.py), from the
    # winning Connected (None: none given).
    principal: str | None = None
    labels: str | None = None

    @property
    def is_open(self) -> bool:
        """Visible to Get: its Connected has been seen and no Disconnected."""
        return self.connected_at_ns is not None and self.disconnected_at_ns is None


_Key = tuple[Any, ...]


# The order of events, as keys: the state's and the event's keys come from these two functions
# alone, so merge() and fold() cannot disagree about which event wins. Every field an event
# sets is in its key, so two events that share (time, id) still have one order.
def _connected_key_of(
    at: int,
    event_id: str,
    gateway_id: str | None,
    source_ip: str | None,
    user_agent: str | None,
    node_id: str | None,
    node_incarnation: int | None,
    principal: str | None,
    labels: str | None,
) -> _Key:
    return (
        at,
        event_id,
        gateway_id or "",
        source_ip or "",
        user_agent or "",
        node_id or "",
        node_incarnation or 0,
        principal or "",
        labels or "",
    )


def _disconnected_key_of(
    at: int, event_id: str, status_code: int | None, reason: str | None
) -> _Key:
    return (at, event_id, f"{status_code or 0:010d}", reason or "", "")


def _connected_key(s: ConnectionState) -> _Key | None:
    if s.connected_at_ns is None or s.connected_event_id is None:
        return None
    return _connected_key_of(
        s.connected_at_ns,
        s.connected_event_id,
        s.gateway_id,
        s.source_ip,
        s.user_agent,
        s.node_id,
        s.node_incarnation,
        s.principal,
        s.labels,
    )


def _disconnected_key(s: ConnectionState) -> _Key | None:
    if s.disconnected_at_ns is None or s.disconnected_event_id is None:
        return None
    return _disconnected_key_of(
        s.disconnected_at_ns,
        s.disconnected_event_id,
        s.disconnect_status_code,
        s.disconnect_reason,
    )


def _earlier(a: _Key | None, b: _Key | None) -> bool:
    """Whether event a sorts strictly before event b; a missing event sorts last."""
    if a is None:
        return False
    return b is None or a < b


def _max(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if a >= b else b


def merge(a: ConnectionState, b: ConnectionState) -> ConnectionState:
    """Join two states of the same connection."""
    if a.connection_id != b.connection_id:
        raise ValueError("cannot merge states of different connections")
    c = b if _earlier(_connected_key(b), _connected_key(a)) else a
    d = b if _earlier(_disconnected_key(b), _disconnected_key(a)) else a
    last = _max(a.last_active_at_ns, b.last_active_at_ns)
    if c is a and d is a and last == a.last_active_at_ns:
        return a
    return ConnectionState(
        a.connection_id,
        c.gateway_id,
        c.source_ip,
        c.user_agent,
        c.connected_at_ns,
        c.connected_event_id,
        last,
        d.disconnected_at_ns,
        d.disconnect_status_code,
        d.disconnect_reason,
        d.disconnected_event_id,
        c.node_id,
        c.node_incarnation,
        c.principal,
        c.labels,
    )


def of_event(event: Event) -> ConnectionState:
    """The state that one event alone implies."""
    p = event.payload
    cid, at, eid = event.connection_id, event.occurred_at_ns, event.event_id
    if isinstance(p, Connected):
        return ConnectionState(
            cid,
            event.gateway_id,
            p.source_ip,
            p.user_agent,
            at,
            eid,
            at,
            None,
            None,
            None,
            None,
            p.node_id or None,
            p.node_incarnation or None,
            p.principal or None,
            to_json(p.labels),
        )
    if isinstance(p, Disconnected):
        return ConnectionState(
            cid, None, None, None, None, None, at, at, p.status_code, p.reason, eid
        )
    assert isinstance(p, Activity), "a node's events are not a connection's (fold_nodes)"
    return ConnectionState(cid, None, None, None, None, None, at, None, None, None, None)


def apply(state: ConnectionState | None, event: Event) -> ConnectionState:
    """Fold one event of a connection into its state (None: nothing known yet)."""
    new = of_event(event)
    return new if state is None else merge(state, new)


_as_tuple: Callable[[Event], EventTuple] = operator.attrgetter(
    "event_id", "connection_id", "gateway_id", "occurred_at_ns", "payload"
)


def fold(events: Iterable[Event]) -> dict[str, ConnectionState]:
    """Fold events of any connections into one state per connection (a node's own events are
    left out: fold_nodes() folds them).

    Equal to applying them one by one: `states[cid] = apply(states.get(cid), event)`."""
    return fold_tuples(map(_as_tuple, events))


# The fields of a state that its winning Connected / Disconnected set, in the state's order.
_ConnectedFields = tuple[str | None, str | None, str | None, int | None, str | None]
_DisconnectedFields = tuple[int | None, int | None, str | None, str | None]
_NodeFields = tuple[str | None, int | None, str | None, str | None]
_NO_CONNECTED: _ConnectedFields = (None, None, None, None, None)
_NO_NODE: _NodeFields = (None, None, None, None)
_NO_DISCONNECTED: _DisconnectedFields = (None, None, None, None)


def fold_tuples(events: Iterable[EventTuple]) -> dict[str, ConnectionState]:
    """fold() of events as conntrack.core.events.decode_tuple() gives them."""
    last_active: dict[str, int] = {}
    # The winning Connected / Disconnected of each connection so far: its key, then its fields.
    connected: dict[str, tuple[_Key, _ConnectedFields, _NodeFields]] = {}
    disconnected: dict[str, tuple[_Key, _DisconnectedFields]] = {}
    last_active_get = last_active.get
    for event_id, cid, gateway_id, at, payload in events:
        if not cid:
            continue  # a node's own event (fold_nodes)
        before = last_active_get(cid)
        if before is None or at > before:
            last_active[cid] = at
        if type(payload) is Activity:  # nine in ten events: nothing more to do
            continue
        if isinstance(payload, Connected):
            ip, ua = payload.source_ip, payload.user_agent
            node, incarnation = payload.node_id or None, payload.node_incarnation or None
            principal, labels = payload.principal or None, to_json(payload.labels)
            key = _connected_key_of(
                at, event_id, gateway_id, ip, ua, node, incarnation, principal, labels
            )
            best_c = connected.get(cid)
            if best_c is None or key < best_c[0]:
                connected[cid] = (
                    key,
                    (gateway_id, ip, ua, at, event_id),
                    (node, incarnation, principal, labels),
                )
        elif isinstance(payload, Disconnected):
            code, reason = payload.status_code, payload.reason
            key = _disconnected_key_of(at, event_id, code, reason)
            best_d = disconnected.get(cid)
            if best_d is None or key < best_d[0]:
                disconnected[cid] = (key, (at, code, reason, event_id))
    states: dict[str, ConnectionState] = {}
    for cid, last in last_active.items():
        c = connected.get(cid) if connected else None
        d = disconnected.get(cid) if disconnected else None
        if c is None and d is None:
            states[cid] = ConnectionState(
                cid, None, None, None, None, None, last, None, None, None, None
            )
            continue
        connected_fields, node_fields = (_NO_CONNECTED, _NO_NODE) if c is None else c[1:]
        disconnected_fields = _NO_DISCONNECTED if d is None else d[1]
        states[cid] = ConnectionState(
            cid, *connected_fields, last, *disconnected_fields, *node_fields
        )
    return states


class NodeState(NamedTuple):
    """What the log says of a gateway node: its newest incarnation, when that one started (None
    while only its heartbeats have been seen), when it was last heard from, and up to which
    incarnation it is fenced (0: none) and since when. A join semilattice like
    ConnectionState: a newer incarnation supersedes what was said of an older one's start and
    sightings; within one incarnation the earliest start and the latest sighting win; the
    highest fence wins whatever the incarnation, and of equal fences the earliest."""

    node_id: str
    incarnation: int
    started_at_ns: int | None
    last_seen_ns: int
    gateway_id: str
    fenced_through: int = 0
    fenced_at_ns: int | None = None

    def fenced(self, incarnation: int | None) -> bool:
        """Whether a connection of this incarnation (None: 0) is closed by a fence."""
        return (incarnation or 0) <= self.fenced_through and self.fenced_through > 0


def _fence(a: NodeState, b: NodeState) -> tuple[int, int | None]:
    if a.fenced_through != b.fenced_through:
        w = a if a.fenced_through > b.fenced_through else b
        return w.fenced_through, w.fenced_at_ns
    if a.fenced_at_ns is None or b.fenced_at_ns is None:
        return a.fenced_through, a.fenced_at_ns if b.fenced_at_ns is None else b.fenced_at_ns
    return a.fenced_through, min(a.fenced_at_ns, b.fenced_at_ns)


def merge_nodes(a: NodeState, b: NodeState) -> NodeState:
    if a.node_id != b.node_id:
        raise ValueError("cannot merge states of different nodes")
    fenced_through, fenced_at = _fence(a, b)
    if a.incarnation != b.incarnation:
        w = a if a.incarnation > b.incarnation else b
        return w._replace(fenced_through=fenced_through, fenced_at_ns=fenced_at)
    started = (
        b.started_at_ns
        if a.started_at_ns is None
        else a.started_at_ns
        if b.started_at_ns is None
        else min(a.started_at_ns, b.started_at_ns)
    )
    return NodeState(
        a.node_id,
        a.incarnation,
        started,
        max(a.last_seen_ns, b.last_seen_ns),
        min(a.gateway_id, b.gateway_id),
        fenced_through,
        fenced_at,
    )


def of_node_event(gateway_id: str, at: int, payload: NodePayload) -> NodeState:
    """The state that one of a node's events alone implies. A fence is not a sighting of the
    node: its last_seen_ns is 0, which any sighting supersedes."""
    node_id, incarnation = payload.node_id, payload.incarnation
    if isinstance(payload, NodeFenced):
        return NodeState(node_id, incarnation, None, 0, gateway_id, incarnation, at)
    started = at if isinstance(payload, NodeStarted) else None
    return NodeState(node_id, incarnation, started, at, gateway_id)


def fold_nodes(events: Iterable[EventTuple]) -> dict[str, NodeState]:
    """The state of every node whose own events (started, heartbeat, fenced) are among these."""
    nodes: dict[str, NodeState] = {}
    for _, _, gateway_id, at, payload in events:
        if isinstance(payload, NODE_PAYLOADS):
            new = of_node_event(gateway_id, at, payload)
            old = nodes.get(payload.node_id)
            nodes[payload.node_id] = new if old is None else merge_nodes(old, new)
    return nodes
