"""When an open connection is gone although no Disconnected says so: its gateway node started
again since (a newer incarnation), or has not been heard from for longer than the lease; or the
connection outlived an idle timeout or a maximum lifetime.

This is judged when the read model is read, at the reader's clock, never written into it: the
read model stays a deterministic function of the log (verify, as-of and rebuild stay exact), and
the judgment is undone by itself when a silent node is heard from again, where a published
"Disconnected: node lost" would be history forever (one stalled node would disconnect all its
users for good). Node times are the nodes' own clocks (occurred_at), so the lease must be much
longer than the heartbeat interval plus the clock skew between nodes and readers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from connection_tracker.fold import NodeState

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
        if node_id:
            node = nodes.get(node_id)
            # No row yet: the node's own events are still on their way to the read model (they
            # travel on another partition); its connection is not judged before they arrive.
            if node is not None:
                if node.incarnation > (node_incarnation or 0):
                    return "node restarted"
                if (
                    self.node_lease_ns
                    and node.incarnation == node_incarnation
                    and node.last_seen_ns < now_ns - self.node_lease_ns
                ):
                    return "node lost"
        if self.idle_timeout_ns and last_active_at_ns < now_ns - self.idle_timeout_ns:
            return "idle"
        if self.max_lifetime_ns and connected_at_ns < now_ns - self.max_lifetime_ns:
            return "lifetime"
        return None
