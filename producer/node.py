"""The node role's incarnation: which start of a gateway node this is.

A node's incarnation is its start time in nanoseconds (the gateway's wall clock), so a node that
restarts, in this process or in a new one, gets a larger number and readers drop the
connections of its older starts. Within one process the number is also made strictly larger
than any this process used before for the same node id, so two starts in the same nanosecond,
or a wall clock that stepped back, still give a newer incarnation.
"""

from __future__ import annotations

import threading
from typing import Final

# Incarnations are stored in signed 64-bit columns (core/events.py checks it).
MAX_INCARNATION: Final = 2**63 - 1

_lock = threading.Lock()
_last_used: dict[str, int] = {}


def next_incarnation(node_id: str, now_ns: int) -> int:
    """The incarnation for a new start of node_id: now_ns, or one more than the last one this
    process used for node_id if that is not smaller. Records it as used."""
    with _lock:
        incarnation = max(now_ns, _last_used.get(node_id, 0) + 1, 1)
        if incarnation > MAX_INCARNATION:
            raise ValueError(f"incarnation {incarnation} does not fit a signed 64-bit integer")
        _last_used[node_id] = incarnation
        return incarnation
