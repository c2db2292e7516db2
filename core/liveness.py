"""When an open connection is gone although no Disconnected says so: its gateway node started
again since (a newer incarnation), or has not been heard from for longer than the lease; or the
connection outlived an idle timeout or a maximum lifetime.

This is judged when the read model is read, at the reader's clock, never written into it: the
read model stays a deterministic function of the log (verify, as-of and rebuild stay exact), and
the lease's judgment is undone by itself when a silent node is heard from again. Only the
lifecycle role's NodeFenced, an event in the log, makes a node's loss final (a fenced
incarnation's connections stay gone whatever the node says later): it is decided once, by one
process that has read the node's partition to its end (docs/lifecycle.md). Node times are the
nodes' own clocks (occurred_at), so the lease must be much longer than the heartbeat interval
plus the clock skew between nodes and readers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from conntrack.core.fold import NodeState

NANOS_PER_SECOND = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Liveness:
    """The rules; a value of 0 turns its rule off."""

    node_lease_ns: int
    idle_timeout_ns: int = 0
    max_lifetime_ns: int = 0

    @classmethod
    def of_seconds(cls, lease: float, idle: float = 0, lifetime: float = 0) -> Liveness:
        return cls(
            round(lease * NANOS_PER_SECOND),
            round(idle * NANOS_PER_SECOND),
            round(lifetime * NANOS_PER_SECOND),
        )

    def bounds(self, nodes: Mapping[str, NodeState], now_ns: int) -> LiveBounds:
        """The rules at now_ns as bounds on a connection's columns: what gone() judges one
        connection by, and what a query over many (the connection directory,
        api/application/directory.py) turns into SQL, so the two cannot disagree."""
        nodes_floor: dict[str, tuple[int, bool, int]] = {}
        for node_id, node in nodes.items():
            lost = bool(self.node_lease_ns) and node.last_seen_ns < now_ns - self.node_lease_ns
            nodes_floor[node_id] = (node.incarnation, lost, node.fenced_through)
        return LiveBounds(
            min_last_active_ns=now_ns - self.idle_timeout_ns if self.idle_timeout_ns else None,
            min_connected_at_ns=now_ns - self.max_lifetime_ns if self.max_lifetime_ns else None,
            nodes=nodes_floor,
        )

    def gone(
        self,
        *,
        node_id: str | None,
        node_incarnation: int | None,
        connected_at_ns: int,
        last_active_at_ns: int,
        nodes: Mapping[str, NodeState],
        now_ns: int,
    ) -> str | None:
        """Why an open connection is gone at now_ns ("node restarted", "node lost", "idle",
        "lifetime"), or None while it is live."""
        return self.bounds(nodes, now_ns).gone(
            node_id=node_id,
            node_incarnation=node_incarnation,
            connected_at_ns=connected_at_ns,
            last_active_at_ns=last_active_at_ns,
        )


@dataclass(frozen=True, slots=True)
class LiveBounds:
    """The liveness rules at one moment. An open connection is live exactly when:
    - its node (if it has one and the read model knows it) has not started again since
      (incarnation >= the node's), and, if the node is lost (silent for longer than the
      lease), the connection belongs to a newer incarnation than the lost one; and its
      incarnation is not fenced (> the node's fenced_through: a fence is for good);
    - last activity >= min_last_active_ns (None: no idle timeout);
    - connected at >= min_connected_at_ns (None: no maximum lifetime).
    A connection without an incarnation counts as incarnation 0; node incarnations are >= 1."""

    min_last_active_ns: int | None
    min_connected_at_ns: int | None
    # node id -> (its newest incarnation, lost, fenced through)
    nodes: Mapping[str, tuple[int, bool, int]]

    def node_floor(self, node_id: str) -> int | None:
        """The least incarnation of a live connection on this node (None: any)."""
        known = self.nodes.get(node_id)
        if known is None:
            return None
        incarnation, lost, fenced_through = known
        return max(incarnation + 1 if lost else incarnation, fenced_through + 1)

    def gone(
        self,
        *,
        node_id: str | None,
        node_incarnation: int | None,
        connected_at_ns: int,
        last_active_at_ns: int,
    ) -> str | None:
        if node_id:
            # No row yet: the node's own events are still on their way to the read model (they
            # travel on another partition); its connection is not judged before they arrive.
            known = self.nodes.get(node_id)
            if known is not None:
                incarnation, lost, fenced_through = known
                if (node_incarnation or 0) <= fenced_through:
                    return "node lost"
                if incarnation > (node_incarnation or 0):
                    return "node restarted"
                if lost and incarnation == node_incarnation:
                    return "node lost"
        if self.min_last_active_ns is not None and last_active_at_ns < self.min_last_active_ns:
            return "idle"
        if self.min_connected_at_ns is not None and connected_at_ns < self.min_connected_at_ns:
            return "lifetime"
        return None
