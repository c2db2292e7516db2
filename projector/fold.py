"""The fold: a pure function from (state, event) to state. No I/O lives here.

The state of a connection is a join-semilattice: every field is chosen by a total order over
events, so applying the same events in any order, any number of times, in any batch split,
gives the same state (property-tested in tests/unit/test_fold.py):

- gateway, identity and connected_at come from the Connected event that sorts first by
  (occurred_at, event_id, then its contents): a retried or duplicated Connected cannot move them;
- last_active_at is the latest event time of any kind;
- disconnected_at, status and reason come from the first Disconnected by the same order.

Ties on (occurred_at, event_id) are broken by the event's contents, so even two different
events that (wrongly) share an id fold to the same state in every order.

Because merge() is associative, commutative and idempotent, a batch can be folded on its own
and then merged into the stored row; the store needs no knowledge of events.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from connection_tracker.events import Activity, Connected, Disconnected, Event


@dataclass(frozen=True, slots=True)
class ConnectionState:
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

    @property
    def is_open(self) -> bool:
        """Visible to Get: its Connected has been seen and no Disconnected."""
        return self.connected_at_ns is not None and self.disconnected_at_ns is None


_Key = tuple[int, str, str, str, str]


def _connected_key(s: ConnectionState) -> _Key | None:
    if s.connected_at_ns is None or s.connected_event_id is None:
        return None
    return (
        s.connected_at_ns,
        s.connected_event_id,
        s.gateway_id or "",
        s.source_ip or "",
        s.user_agent or "",
    )


def _disconnected_key(s: ConnectionState) -> _Key | None:
    if s.disconnected_at_ns is None or s.disconnected_event_id is None:
        return None
    return (
        s.disconnected_at_ns,
        s.disconnected_event_id,
        f"{s.disconnect_status_code or 0:010d}",
        s.disconnect_reason or "",
        "",
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
    out = a
    if _earlier(_connected_key(b), _connected_key(a)):
        out = replace(
            out,
            gateway_id=b.gateway_id,
            source_ip=b.source_ip,
            user_agent=b.user_agent,
            connected_at_ns=b.connected_at_ns,
            connected_event_id=b.connected_event_id,
        )
    if _earlier(_disconnected_key(b), _disconnected_key(a)):
        out = replace(
            out,
            disconnected_at_ns=b.disconnected_at_ns,
            disconnect_status_code=b.disconnect_status_code,
            disconnect_reason=b.disconnect_reason,
            disconnected_event_id=b.disconnected_event_id,
        )
    last = _max(a.last_active_at_ns, b.last_active_at_ns)
    if last != out.last_active_at_ns:
        out = replace(out, last_active_at_ns=last)
    return out


def of_event(event: Event) -> ConnectionState:
    """The state that one event alone implies."""
    p = event.payload
    base = ConnectionState(event.connection_id, last_active_at_ns=event.occurred_at_ns)
    if isinstance(p, Connected):
        return replace(
            base,
            gateway_id=event.gateway_id,
            source_ip=p.source_ip,
            user_agent=p.user_agent,
            connected_at_ns=event.occurred_at_ns,
            connected_event_id=event.event_id,
        )
    if isinstance(p, Disconnected):
        return replace(
            base,
            disconnected_at_ns=event.occurred_at_ns,
            disconnect_status_code=p.status_code,
            disconnect_reason=p.reason,
            disconnected_event_id=event.event_id,
        )
    assert isinstance(p, Activity)
    return base


def apply(state: ConnectionState | None, event: Event) -> ConnectionState:
    """Fold one event into a connection's state (None: nothing known yet)."""
    new = of_event(event)
    return new if state is None else merge(state, new)


def fold(events: Iterable[Event]) -> dict[str, ConnectionState]:
    """Fold events of any connections into one state per connection."""
    states: dict[str, ConnectionState] = {}
    for event in events:
        states[event.connection_id] = apply(states.get(event.connection_id), event)
    return states
