"""A day of a gateway's traffic as events, for the tests of presence in time: connections of
many principals coming and going on a few nodes that die, stall, restart and get fenced."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from conntrack.core.events import (
    Activity,
    Connected,
    Disconnected,
    Event,
    NodeFenced,
    NodeHeartbeat,
    NodeStarted,
)

SECOND = 1_000_000_000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
GATEWAY = "gw-h"


@dataclass
class _Node:
    node_id: str
    incarnation: int = 1
    # (start, end, incarnation) of each stretch the node was up; a stall splits a stretch.
    up: list[tuple[int, int, int]] = field(default_factory=list)

    def holder_at(self, at: int) -> int | None:
        """The incarnation up at `at`, if any."""
        for start, end, incarnation in self.up:
            if start <= at < end:
                return incarnation
        return None


@dataclass
class Day:
    events: list[Event]
    principals: list[str]
    start_ns: int
    end_ns: int


def simulate_day(
    rnd: random.Random,
    end_ns: int,
    *,
    nodes: int = 4,
    connections: int = 2500,
    principals: int = 1000,
    heartbeat_ns: int = MINUTE,
    lease_ns: int = 150 * SECOND,
    span_ns: int = 24 * HOUR,
) -> Day:
    start = end_ns - span_ns
    events: list[Event] = []
    seq = iter(range(10**9))

    def emit(cid: str, gateway: str, at: int, payload: object) -> None:
        events.append(Event(f"h-{next(seq)}", cid, gateway, at, payload))  # type: ignore[arg-type]

    fleet = [_Node(f"node-{i}") for i in range(nodes)]
    for node in fleet:
        at = start + rnd.randrange(10 * MINUTE)
        incarnation = 1
        emit("", GATEWAY, at, NodeStarted(node.node_id, incarnation))
        stretch_start = at
        while at < end_ns:
            roll = rnd.random()
            if roll < 0.0015:  # dies: silent, maybe fenced, later starts again
                node.up.append((stretch_start, at + 1, incarnation))
                if rnd.random() < 0.5:
                    emit(
                        "",
                        GATEWAY,
                        at + lease_ns + 7 * SECOND,
                        NodeFenced(node.node_id, incarnation),
                    )
                at += rnd.randrange(5 * MINUTE, 90 * MINUTE)
                incarnation += 1
                emit("", GATEWAY, at, NodeStarted(node.node_id, incarnation))
                stretch_start = at
            elif roll < 0.003:  # stalls for longer than the lease, then is heard from again
                at += rnd.randrange(lease_ns + MINUTE, lease_ns + 20 * MINUTE)
            else:
                at += heartbeat_ns + rnd.randrange(-2 * SECOND, 2 * SECOND)
            if at < end_ns:
                emit("", GATEWAY, at, NodeHeartbeat(node.node_id, incarnation))
        node.up.append((stretch_start, end_ns, incarnation))
        node.incarnation = incarnation

    names = [f"user-{i}" for i in range(principals)]
    for i in range(connections):
        cid = f"c{i:05d}-{rnd.randrange(16**6):06x}"
        gateway = GATEWAY if rnd.random() < 0.95 else "gw-other"
        connected = start + rnd.randrange(span_ns)
        node = rnd.choice(fleet)
        holder = node.holder_at(connected)
        if holder is None:
            continue  # the node was down: the gateway would have sent the client elsewhere
        incarnation = holder
        duration = int(rnd.expovariate(1 / (40 * MINUTE))) + SECOND
        if rnd.random() < 0.05:
            duration += rnd.randrange(6 * HOUR)  # a long-lived one
        disconnected = connected + duration
        died = next(
            (end for s, end, inc in node.up if inc == incarnation and s <= connected < end), end_ns
        )
        emit(
            cid,
            gateway,
            connected,
            Connected(
                f"10.0.{rnd.randrange(256)}.1",
                "ua",
                node.node_id,
                incarnation,
                rnd.choice(names),
                (("tier", rnd.choice(["gold", "free"])),),
            ),
        )
        last = min(disconnected, died, end_ns)
        for _ in range(rnd.randrange(4)):
            emit(cid, gateway, connected + rnd.randrange(max(1, last - connected)), Activity(1))
        if disconnected < died and disconnected < end_ns:
            emit(cid, gateway, disconnected, Disconnected(rnd.choice([1000, 1001, 4000]), "bye"))
    rnd.shuffle(events)  # the log's order is not the events' order
    return Day(events, names, start, end_ns)
