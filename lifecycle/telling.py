"""The lifecycle role's pure core: from the event log to "opened" and "closed", each told once
per connection, and the fencing of lost nodes. No I/O lives here (lifecycle/runner.py does it).

A connection is told `opened` when its first Connected is read, and `closed` exactly once, for
the first of:
- its Disconnected (the reason from Disconnected.cause);
- a fence of its node's incarnation (NodeFenced: node_lost, at the fence's time);
- a newer incarnation of its node (NodeStarted or a heartbeat of it: node_restarted).
A Connected that arrives when one of these is already known (a Disconnected read first, a fenced
or superseded incarnation) is told `opened` and at once `closed`. Whatever its node says later of
a closed connection changes nothing.

Every change of state is also a change of the changelog (`changes`: key -> value, None deletes),
which the runner writes in the same Kafka transaction as the told records and the consumed
offsets, and reads back on start (`restore`), so the state always matches the offsets.

A node is fenced (`due_fences`) when it has told connections open, has not been heard from for
longer than the lease by this process's clock, and the runner has read the log to its end (a
process that lags must not take old heartbeats for silence, nor close as lost a connection
whose Disconnected it has not read yet). The fence is in the state
at once (committed with what it closed) and marked unpublished until the runner has its NodeFenced
acknowledged on the events topic (`fence_published`); a restart publishes the unpublished ones
again (the fold takes a repeated fence as one).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from conntrack.core.events import (
    Cause,
    Connected,
    Disconnected,
    EventTuple,
    NodeFenced,
    NodeHeartbeat,
    NodeStarted,
)
from conntrack.core.labels import Labels
from conntrack.core.protogen.conntrack.lifecycle.v1 import lifecycle_pb2 as pb


class Reason:
    """Closed.Reason of lifecycle.proto, by number."""

    UNSPECIFIED = pb.Closed.REASON_UNSPECIFIED
    CLIENT_CLOSED = pb.Closed.CLIENT_CLOSED
    DISCONNECTED_BY_API = pb.Closed.DISCONNECTED_BY_API
    NODE_LOST = pb.Closed.NODE_LOST
    NODE_RESTARTED = pb.Closed.NODE_RESTARTED
    IDLE_TIMEOUT = pb.Closed.IDLE_TIMEOUT
    MAX_LIFETIME = pb.Closed.MAX_LIFETIME
    GATEWAY_SHUTDOWN = pb.Closed.GATEWAY_SHUTDOWN
    GATEWAY_ERROR = pb.Closed.GATEWAY_ERROR


_REASON_OF_CAUSE: dict[int, int] = {
    Cause.UNSPECIFIED: Reason.UNSPECIFIED,
    Cause.CLIENT_CLOSED: Reason.CLIENT_CLOSED,
    Cause.DISCONNECTED_BY_API: Reason.DISCONNECTED_BY_API,
    Cause.GATEWAY_SHUTDOWN: Reason.GATEWAY_SHUTDOWN,
    Cause.IDLE_TIMEOUT: Reason.IDLE_TIMEOUT,
    Cause.MAX_LIFETIME: Reason.MAX_LIFETIME,
    Cause.GATEWAY_ERROR: Reason.GATEWAY_ERROR,
    Cause.NODE_FENCED: Reason.NODE_LOST,
}


@dataclass(frozen=True, slots=True)
class Told:
    """One record of the lifecycle topic."""

    kind: Literal["opened", "closed"]
    connection_id: str
    gateway_id: str
    node_id: str
    incarnation: int
    at_ns: int
    # opened
    principal: str = ""
    labels: Labels = ()
    source_ip: str = ""
    user_agent: str = ""
    # closed
    reason: int = Reason.UNSPECIFIED
    status_code: int = 0
    reason_text: str = ""


@dataclass(frozen=True, slots=True)
class Fence:
    """A decision to fence a node's incarnations up to `incarnation`, at `at_ns`."""

    node_id: str
    incarnation: int
    gateway_id: str
    at_ns: int


@dataclass(slots=True)
class _Open:
    gateway_id: str
    node_id: str
    incarnation: int
    connected_at_ns: int


@dataclass(slots=True)
class _Node:
    incarnation: int
    # Its newest incarnation's start (or first sighting), and the last sighting of any.
    since_ns: int
    last_seen_ns: int
    gateway_id: str
    partition: int
    fenced_through: int = 0
    fenced_at_ns: int = 0
    # Whether the NodeFenced of fenced_through is known to be in the events topic.
    fence_published: bool = True


# A Disconnected read before its Connected: (at, status code, reason text, lifecycle reason).
_Early = tuple[int, int, str, int]

_CONN, _NODE = "c/", "n/"


@dataclass
class Teller:
    lease_ns: int
    # How long a closed connection is remembered (so a late duplicate of its Connected is not
    # told again), by the clock of the events that closed it.
    remember_closed_ns: int
    told: list[Told] = field(default_factory=list)
    changes: dict[str, str | None] = field(default_factory=dict)
    _open: dict[str, _Open] = field(default_factory=dict)
    _closed: dict[str, int] = field(default_factory=dict)
    _early: dict[str, _Early] = field(default_factory=dict)
    _nodes: dict[str, _Node] = field(default_factory=dict)
    # node -> incarnation -> its open connections
    _by_node: dict[str, dict[int, set[str]]] = field(default_factory=dict)
    # The latest event time read: the clock by which closed connections are forgotten.
    _latest_ns: int = 0

    # -- the log ---------------------------------------------------------------------------

    def on_event(self, partition: int, event: EventTuple) -> None:
        event_id, cid, gateway_id, at, payload = event
        del event_id
        self._latest_ns = max(self._latest_ns, at)
        if isinstance(payload, Connected):
            self._connected(cid, gateway_id, at, payload)
        elif isinstance(payload, Disconnected):
            self._disconnected(cid, at, payload)
        elif isinstance(payload, NodeStarted | NodeHeartbeat):
            self._sighted(partition, gateway_id, at, payload)
        elif isinstance(payload, NodeFenced):
            self._fenced(Fence(payload.node_id, payload.incarnation, gateway_id, at), partition)

    def _connected(self, cid: str, gateway_id: str, at: int, p: Connected) -> None:
        if cid in self._open or cid in self._closed:
            return  # told already: a duplicate, or a late word of a closed connection
        node_id, incarnation = p.node_id, p.node_incarnation
        self._tell(
            Told(
                "opened",
                cid,
                gateway_id,
                node_id,
                incarnation,
                at,
                principal=p.principal,
                labels=p.labels,
                source_ip=p.source_ip,
                user_agent=p.user_agent,
            )
        )
        opened = _Open(gateway_id, node_id, incarnation, at)
        early = self._early.pop(cid, None)
        node = self._nodes.get(node_id) if node_id else None
        if early is not None:
            at_close, code, text, reason = early
            self._close(cid, opened, max(at_close, at), reason, code, text)
        elif node is not None and 0 < incarnation <= node.fenced_through:
            self._close(cid, opened, max(node.fenced_at_ns, at), Reason.NODE_LOST)
        elif node is not None and incarnation < node.incarnation:
            self._close(cid, opened, max(node.since_ns, at), Reason.NODE_RESTARTED)
        else:
            self._open[cid] = opened
            self._by_node.setdefault(node_id, {}).setdefault(incarnation, set()).add(cid)
            self._save_open(cid, opened)

    def _disconnected(self, cid: str, at: int, p: Disconnected) -> None:
        reason = _REASON_OF_CAUSE.get(p.cause, Reason.UNSPECIFIED)
        opened = self._open.get(cid)
        if opened is not None:
            self._close(cid, opened, at, reason, p.status_code, p.reason)
        elif cid not in self._closed and cid not in self._early:
            self._early[cid] = (at, p.status_code, p.reason, reason)
            self.changes[_CONN + cid] = json.dumps({"e": [at, p.status_code, p.reason, reason]})

    def _sighted(
        self, partition: int, gateway_id: str, at: int, p: NodeStarted | NodeHeartbeat
    ) -> None:
        node = self._nodes.get(p.node_id)
        if node is None:
            node = _Node(p.incarnation, at, at, gateway_id, partition)
            self._nodes[p.node_id] = node
        elif p.incarnation > node.incarnation:
            node.incarnation, node.since_ns, node.gateway_id = p.incarnation, at, gateway_id
            node.last_seen_ns = max(node.last_seen_ns, at)
        else:
            node.last_seen_ns = max(node.last_seen_ns, at)
        node.partition = partition
        self._save_node(p.node_id, node)
        # A newer start supersedes the older incarnations' connections.
        for incarnation in [i for i in self._by_node.get(p.node_id, {}) if i < node.incarnation]:
            self._close_incarnation(p.node_id, incarnation, node.since_ns, Reason.NODE_RESTARTED)

    def _fenced(self, fence: Fence, partition: int | None) -> None:
        """A fence read from the log (partition given) or decided here (None: its NodeFenced
        is still to be published)."""
        node = self._nodes.get(fence.node_id)
        if node is None:
            node = _Node(fence.incarnation, fence.at_ns, 0, fence.gateway_id, partition or 0)
            self._nodes[fence.node_id] = node
        if fence.incarnation > node.fenced_through:
            node.fenced_through, node.fenced_at_ns = fence.incarnation, fence.at_ns
            node.fence_published = partition is not None
        elif fence.incarnation == node.fenced_through:
            node.fenced_at_ns = min(node.fenced_at_ns, fence.at_ns)
            node.fence_published = node.fence_published or partition is not None
        self._save_node(fence.node_id, node)
        incarnations = self._by_node.get(fence.node_id, {})
        for incarnation in [i for i in incarnations if i <= node.fenced_through]:
            self._close_incarnation(fence.node_id, incarnation, node.fenced_at_ns, Reason.NODE_LOST)

    # -- the clock -------------------------------------------------------------------------

    def due_fences(self, now_ns: int, caught_up: bool) -> list[Fence]:
        """Fence every node silent for longer than the lease that holds told-open connections
        of an unfenced incarnation, if the log has been read to its end (caught_up: every
        partition, so neither a heartbeat of the node nor a Disconnected of one of its
        connections is still unread). The fences are applied here; the runner publishes them."""
        if not self.lease_ns or not caught_up:
            return []
        fences = []
        for node_id, node in self._nodes.items():
            if node.last_seen_ns >= now_ns - self.lease_ns:
                continue
            held = [
                i
                for i, cids in self._by_node.get(node_id, {}).items()
                if cids and i > node.fenced_through
            ]
            if held:
                incarnation = max(*held, node.incarnation)
                fences.append(Fence(node_id, incarnation, node.gateway_id, now_ns))
        for fence in fences:
            self._fenced(fence, None)
        return fences

    def unpublished_fences(self) -> list[Fence]:
        """Fences decided here whose NodeFenced is not yet known to be in the events topic."""
        return [
            Fence(node_id, node.fenced_through, node.gateway_id, node.fenced_at_ns)
            for node_id, node in sorted(self._nodes.items())
            if node.fenced_through and not node.fence_published
        ]

    def fence_published(self, fence: Fence) -> None:
        """The fence's NodeFenced (and notice) were acknowledged by the broker."""
        node = self._nodes.get(fence.node_id)
        if node is not None and node.fenced_through == fence.incarnation:
            node.fence_published = True
            self._save_node(fence.node_id, node)

    def forget_closed(self) -> None:
        """Forget connections closed longer ago than remember_closed_ns (by the latest event
        time read), and Disconnecteds as old whose Connected never came, in the state and the
        changelog."""
        horizon = self._latest_ns - self.remember_closed_ns
        for cid in [c for c, at in self._closed.items() if at < horizon]:
            del self._closed[cid]
            self.changes[_CONN + cid] = None
        for cid in [c for c, early in self._early.items() if early[0] < horizon]:
            del self._early[cid]
            self.changes[_CONN + cid] = None

    # -- state -----------------------------------------------------------------------------

    def take(self) -> tuple[list[Told], dict[str, str | None]]:
        """What was told and changed since the last take(), for one transaction."""
        told, changes = self.told, self.changes
        self.told, self.changes = [], {}
        return told, changes

    def restore(self, key: str, value: str) -> None:
        """One changelog record, read back on start (later records of a key replace earlier
        ones; a deleted key is never passed)."""
        data = json.loads(value)
        if key.startswith(_NODE):
            node = _Node(*data)
            self._nodes[key[len(_NODE) :]] = node
            return
        cid = key[len(_CONN) :]
        self.forget_restored(key)
        if "o" in data:
            opened = _Open(*data["o"])
            self._open[cid] = opened
            self._by_node.setdefault(opened.node_id, {}).setdefault(opened.incarnation, set()).add(
                cid
            )
        elif "c" in data:
            self._closed[cid] = data["c"]
            self._latest_ns = max(self._latest_ns, data["c"])
        elif "e" in data:
            at, code, text, reason = data["e"]
            self._early[cid] = (at, code, text, reason)

    def forget_restored(self, key: str) -> None:
        """A changelog key deleted since it was restored (a tombstone read later)."""
        if key.startswith(_NODE):
            self._nodes.pop(key[len(_NODE) :], None)
            return
        cid = key[len(_CONN) :]
        self._closed.pop(cid, None)
        self._early.pop(cid, None)
        opened = self._open.pop(cid, None)
        if opened is not None:
            self._by_node.get(opened.node_id, {}).get(opened.incarnation, set()).discard(cid)

    def open_connections(self) -> Iterator[str]:
        return iter(self._open)

    @property
    def open_count(self) -> int:
        return len(self._open)

    # -- inside ----------------------------------------------------------------------------

    def _close_incarnation(self, node_id: str, incarnation: int, at: int, reason: int) -> None:
        for cid in sorted(self._by_node[node_id].pop(incarnation, ())):
            opened = self._open.get(cid)
            if opened is not None:
                self._close(cid, opened, max(at, opened.connected_at_ns), reason)
        if not self._by_node[node_id]:
            del self._by_node[node_id]

    def _close(
        self, cid: str, opened: _Open, at: int, reason: int, code: int = 0, text: str = ""
    ) -> None:
        self._tell(
            Told(
                "closed",
                cid,
                opened.gateway_id,
                opened.node_id,
                opened.incarnation,
                at,
                reason=reason,
                status_code=code,
                reason_text=text,
            )
        )
        if self._open.pop(cid, None) is not None:
            held = self._by_node.get(opened.node_id, {}).get(opened.incarnation)
            if held is not None:
                held.discard(cid)
        self._closed[cid] = at
        self.changes[_CONN + cid] = json.dumps({"c": at})

    def _tell(self, told: Told) -> None:
        self.told.append(told)

    def _save_open(self, cid: str, opened: _Open) -> None:
        self.changes[_CONN + cid] = json.dumps(
            {"o": [opened.gateway_id, opened.node_id, opened.incarnation, opened.connected_at_ns]}
        )

    def _save_node(self, node_id: str, node: _Node) -> None:
        self.changes[_NODE + node_id] = json.dumps(
            [
                node.incarnation,
                node.since_ns,
                node.last_seen_ns,
                node.gateway_id,
                node.partition,
                node.fenced_through,
                node.fenced_at_ns,
                node.fence_published,
            ]
        )
