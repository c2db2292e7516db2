"""What the read side answers with: the values the application gets from the read model, and
the one failure every read can end in."""

from __future__ import annotations

from dataclasses import dataclass

from conntrack.core.labels import Selector


class ReadModelUnavailable(RuntimeError):
    """The read-model database cannot be reached or answered with an error."""


@dataclass(frozen=True, slots=True)
class ConnectionView:
    id: str
    gateway_id: str
    source_ip: str
    user_agent: str
    connected_at_ns: int
    last_active_at_ns: int
    node_id: str | None = None
    node_incarnation: int | None = None
    # Read by the directory only (Get's answer has no place for them): who the connection is
    # for, and its labels as canonical JSON (core/labels.py).
    principal: str | None = None
    labels: str | None = None


@dataclass(frozen=True, slots=True)
class DirectoryFilter:
    """Which open connections the connection directory lists or counts
    (api/application/directory.py): a gateway's, and of those the ones every given condition holds
    for (None: no condition)."""

    gateway_id: str
    node_id: str | None = None
    source_ip: str | None = None
    last_active_before_ns: int | None = None
    connected_before_ns: int | None = None  # exclusive
    connected_after_ns: int | None = None  # inclusive
    principal: str | None = None
    labels: Selector = ()  # every requirement must hold (core/labels.py)


@dataclass(frozen=True, slots=True)
class PartitionPosition:
    topic: str
    partition: int
    next_offset: int
