"""Simulated gateway traffic, reproducible from a seed: for demos, tests and benchmarks."""

from __future__ import annotations

import ipaddress
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

from connection_tracker.events import Activity, Connected, Disconnected, Event

_USER_AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/18.1 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
    "okhttp/4.12.0",
    "Python/3.12 websockets/14.1",
    "Go-http-client/1.1",
)


@dataclass(frozen=True)
class Workload:
    gateways: int = 3
    connections: int = 100
    activities_per_connection: int = 5
    disconnect_ratio: float = 0.5
    seed: int = 1


def _ip(rng: random.Random) -> str:
    if rng.random() < 0.25:
        return str(ipaddress.IPv6Address((0x2001_0DB8 << 96) | rng.getrandbits(96)))
    return str(ipaddress.IPv4Address(rng.randrange(0x0B00_0000, 0xDF00_0000)))


def generate(w: Workload, start_ns: int | None = None) -> Iterator[Event]:
    """Events of w, in a plausible interleaving; the same seed gives the same events."""
    rng = random.Random(w.seed)
    now = time.time_ns() if start_ns is None else start_ns
    gateways = [f"d5d{rng.getrandbits(64):016x}" for _ in range(w.gateways)]
    for n in range(w.connections):
        cid = f"{rng.getrandbits(96):024x}"
        gw = rng.choice(gateways)
        t = now + n * 1_000_003

        def ev(kind: Connected | Activity | Disconnected, at: int, i: int) -> Event:
            return Event(f"{cid}-{i}", cid, gw, at, kind)

        yield ev(Connected(_ip(rng), rng.choice(_USER_AGENTS)), t, 0)
        for i in range(w.activities_per_connection):
            t += rng.randrange(1, 5_000_000_000)
            yield ev(Activity(rng.randrange(1, 50)), t, i + 1)
        if rng.random() < w.disconnect_ratio:
            t += rng.randrange(1, 5_000_000_000)
            yield ev(Disconnected(rng.choice((1000, 1001, 1006)), "simulated"), t, 999_999)
