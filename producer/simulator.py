"""Simulated gateway traffic, reproducible from a seed: for demos, tests and benchmarks.

A small discrete-event simulation in simulated time (no sleeping, no I/O): connections arrive
as a Poisson process at `connect_rate` per second across `gateways` gateways, at most
`concurrent` of them open at once (an arrival waits for a free slot). Each connection produces
`activities_per_connection` Activity events (already coalesced, as a gateway would publish
them) spaced exponentially at `activity_rate` per second, then disconnects with probability
`disconnect_ratio` after one more such gap; the others stay open. Generation stops when every
connection is done, at `duration_s` of simulated time, or after `max_events` events.

The same Workload (seed included) and start time give the same events, ids included, either
interleaved by time (as gateways publish them) or grouped per connection (see generate()).
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from conntrack.core.events import Activity, Connected, Disconnected, Event, Payload

# Weighted roughly like the clients a WebSocket API sees: browsers first, then mobile SDKs,
# server-side clients and scripts.
_USER_AGENTS: tuple[tuple[str, int], ...] = (
    (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/131.0.0.0 Safari/537.36",
        30,
    ),
    (
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Version/18.1 Safari/605.1.15",
        12,
    ),
    ("Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0", 8),
    (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
        15,
    ),
    (
        "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/131.0.6778.81 Mobile Safari/537.36",
        15,
    ),
    ("okhttp/4.12.0", 8),
    ("Dart/3.5 (dart:io)", 4),
    ("Python/3.12 websockets/14.1", 4),
    ("Go-http-client/1.1", 2),
    ("node-fetch/1.0 (+https://github.com/websockets/ws)", 2),
)

_DEVICES = ("web", "ios", "android")

# (status code, reason, weight): RFC 6455 close codes as gateways see them; 0 = no close frame.
_CLOSES: tuple[tuple[int, str, int], ...] = (
    (1000, "", 60),
    (1001, "going away", 25),
    (0, "connection lost", 10),
    (1011, "internal error", 3),
    (1008, "policy violation", 2),
)

# Kinds of scheduled happenings: a new connection arrives; an arrival that waited for a free
# slot is admitted; a connection's next activity (or, when it has none left, its end).
_ARRIVE, _ADMIT, _NEXT = 0, 1, 2


@dataclass(frozen=True)
class Workload:
    gateways: int = 3
    connections: int = 100
    """Connections opened in total."""
    activities_per_connection: int = 5
    disconnect_ratio: float = 0.5
    seed: int = 1
    concurrent: int | None = None
    """Most connections open at once (None: no limit)."""
    connect_rate: float = 100.0
    """New connections per second (simulated time), across all gateways."""
    activity_rate: float = 1.0
    """Activity events per second per open connection."""
    duration_s: float | None = None
    """Stop after this much simulated time."""
    max_events: int | None = None
    """Stop after this many events."""
    ipv6_share: float = 0.3
    principals: int = 0
    """Connections belong to this many principals ("user-<n>"), each labelled with a tenant
    (one of ten) and a device; 0: no principals or labels (and the same events as before)."""

    def __post_init__(self) -> None:
        if self.gateways < 1:
            raise ValueError("gateways must be >= 1")
        if self.connections < 0:
            raise ValueError("connections must be >= 0")
        if self.activities_per_connection < 0:
            raise ValueError("activities_per_connection must be >= 0")
        if self.concurrent is not None and self.concurrent < 1:
            raise ValueError("concurrent must be >= 1")
        if self.connect_rate <= 0 or self.activity_rate <= 0:
            raise ValueError("connect_rate and activity_rate must be > 0")
        for name in ("disconnect_ratio", "ipv6_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError("duration_s must be > 0")
        if self.principals < 0:
            raise ValueError("principals must be >= 0")
        if self.max_events is not None and self.max_events < 0:
            raise ValueError("max_events must be >= 0")


def _global(rng: random.Random, version: int) -> str:
    """A random globally routable address (no private, reserved or documentation ranges)."""
    while True:
        if version == 6:
            # 2000::/3 is the global unicast block.
            address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(
                (0b001 << 125) | rng.getrandbits(125)
            )
        else:
            address = ipaddress.IPv4Address(rng.getrandbits(32))
        if address.is_global and not address.is_multicast:
            return str(address)


def _gap_ns(rng: random.Random, rate: float) -> int:
    """An exponential gap for a Poisson process of `rate` per second, in ns (at least 1)."""
    return max(1, int(rng.expovariate(rate) * 1_000_000_000))


Order = Literal["connection", "time"]


def generate(
    w: Workload, start_ns: int | None = None, *, order: Order = "connection"
) -> Iterator[Event]:
    """The events of w; the same workload and start time give the same events, ids included.

    order="time" yields them as the gateways would publish them: all connections interleaved by
    time (what `conntrack-producer simulate` publishes). order="connection" (the default, which
    benchmarks build their own interleavings from) yields the same events grouped per
    connection, each connection's events together and in order, connections in the order they
    finish.
    """
    timeline = _timeline(w, time.time_ns() if start_ns is None else start_ns)
    if order == "time":
        events: Iterator[Event] = (e for e, _, _ in timeline if e is not None)
    elif order == "connection":
        events = _grouped(timeline)
    else:
        raise ValueError(f"order must be 'connection' or 'time', not {order!r}")
    return events if w.max_events is None else itertools.islice(events, w.max_events)


def _grouped(timeline: Iterator[tuple[Event | None, str, bool]]) -> Iterator[Event]:
    # Only live connections are held back, so memory follows the concurrency, not the length.
    held: dict[str, list[Event]] = {}
    for event, cid, finished in timeline:
        if event is not None:
            held.setdefault(cid, []).append(event)
        if finished:
            yield from held.pop(cid, [])
    for events in held.values():
        yield from events


def _timeline(w: Workload, start: int) -> Iterator[tuple[Event | None, str, bool]]:
    """(event or None, connection id, whether the connection has no more events), in time
    order."""
    rng = random.Random(w.seed)
    end = None if w.duration_s is None else start + int(w.duration_s * 1_000_000_000)
    gateways = [f"d5d{rng.getrandbits(64):017x}" for _ in range(w.gateways)]
    agents = [a for a, _ in _USER_AGENTS]
    agent_weights = [wt for _, wt in _USER_AGENTS]
    closes = [(c, r) for c, r, _ in _CLOSES]
    close_weights = [wt for _, _, wt in _CLOSES]

    # (time, sequence, kind, connection id): the sequence breaks ties deterministically.
    queue: list[tuple[int, int, int, str]] = []
    sequence = 0

    def schedule(at: int, kind: int, cid: str = "") -> None:
        nonlocal sequence
        heapq.heappush(queue, (at, sequence, kind, cid))
        sequence += 1

    gateway_of: dict[str, str] = {}
    activities_left: dict[str, int] = {}
    waiting_arrivals = 0  # arrivals held back because `concurrent` connections were open

    def event(cid: str, at: int, payload: Payload) -> Event:
        return Event(
            str(uuid.UUID(int=rng.getrandbits(128), version=4)), cid, gateway_of[cid], at, payload
        )

    def open_connection(at: int) -> Event:
        cid = f"{rng.getrandbits(96):024x}"
        gateway_of[cid] = rng.choice(gateways)
        activities_left[cid] = w.activities_per_connection
        schedule(at + _gap_ns(rng, w.activity_rate), _NEXT, cid)
        version = 6 if rng.random() < w.ipv6_share else 4
        identity = Connected(_global(rng, version), rng.choices(agents, agent_weights)[0])
        if w.principals:
            user = rng.randrange(w.principals)
            labels = (("device", rng.choice(_DEVICES)), ("tenant", f"tenant-{user % 10}"))
            identity = Connected(
                identity.source_ip, identity.user_agent, principal=f"user-{user}", labels=labels
            )
        return event(cid, at, identity)

    arrivals = 0
    if w.connections > 0:
        schedule(start, _ARRIVE)
        arrivals = 1
    while queue:
        at, _, kind, cid = heapq.heappop(queue)
        if end is not None and at >= end:
            return
        if kind in (_ARRIVE, _ADMIT):
            if kind == _ARRIVE and arrivals < w.connections:
                schedule(at + _gap_ns(rng, w.connect_rate), _ARRIVE)
                arrivals += 1
            if w.concurrent is not None and len(gateway_of) >= w.concurrent:
                waiting_arrivals += 1
                continue
            opened = open_connection(at)
            yield opened, opened.connection_id, False
        elif activities_left[cid] > 0:
            activities_left[cid] -= 1
            yield event(cid, at, Activity(rng.randint(1, 120))), cid, False
            schedule(at + _gap_ns(rng, w.activity_rate), _NEXT, cid)
        elif rng.random() < w.disconnect_ratio:
            code, reason = rng.choices(closes, close_weights)[0]
            closed = event(cid, at, Disconnected(code, reason))
            del gateway_of[cid], activities_left[cid]
            if waiting_arrivals:
                # The connection's slot goes to an arrival that was waiting for one.
                waiting_arrivals -= 1
                schedule(at, _ADMIT)
            yield closed, cid, True
        else:
            yield None, cid, True  # stays open (and keeps its slot), with nothing more to say
