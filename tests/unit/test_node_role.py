"""The node role without a broker: the incarnation choice and the checks at construction."""

from __future__ import annotations

import uuid

import pytest

from conntrack.core.events import InvalidEvent
from conntrack.producer.node import MAX_INCARNATION, next_incarnation
from conntrack.producer.publisher import Publisher

T = 1_700_000_000_000_000_000


def fresh_node() -> str:
    # The choice remembers every node id this process used; each test takes its own.
    return f"node-{uuid.uuid4().hex}"


def test_the_incarnation_is_the_clock_when_it_moves_forward() -> None:
    node = fresh_node()
    assert next_incarnation(node, T) == T
    assert next_incarnation(node, T + 5) == T + 5


def test_the_incarnation_grows_even_when_the_clock_does_not() -> None:
    node = fresh_node()
    assert next_incarnation(node, T) == T
    assert next_incarnation(node, T) == T + 1  # two starts in one nanosecond
    assert next_incarnation(node, T - 1_000_000) == T + 2  # the wall clock stepped back
    assert next_incarnation(node, T + 10) == T + 10


def test_each_node_id_has_its_own_sequence() -> None:
    a, b = fresh_node(), fresh_node()
    assert next_incarnation(a, T) == T
    assert next_incarnation(b, T) == T
    assert next_incarnation(a, T) == T + 1


def test_the_incarnation_is_positive_and_fits_64_signed_bits() -> None:
    assert next_incarnation(fresh_node(), 0) == 1
    with pytest.raises(ValueError, match="64-bit"):
        next_incarnation(fresh_node(), MAX_INCARNATION + 1)


def make(**options: object) -> Publisher:
    return Publisher("127.0.0.1:1", "topic", "gw", **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("node_id", "message"),
    [
        ("", "node_id is required"),
        ("n" * 256, "node_id must be at most 255 characters"),
        ("no\x00de", "node_id must not contain NUL"),
        ("\ud800", "cannot encode event"),
    ],
)
def test_a_bad_node_id_is_refused_at_construction(node_id: str, message: str) -> None:
    with pytest.raises(InvalidEvent, match=message):
        make(node_id=node_id)


@pytest.mark.parametrize("interval", [0, -1, float("nan")])
def test_the_heartbeat_interval_must_be_positive(interval: float) -> None:
    with pytest.raises(ValueError, match="heartbeat_interval_s must be > 0"):
        make(node_id="n", heartbeat_interval_s=interval)


def test_a_valid_node_id_is_accepted_and_exposed() -> None:
    pub = make(node_id="n" * 255)
    assert pub.node_id == "n" * 255
    assert pub.incarnation is None  # chosen at start()
    plain = make()
    assert plain.node_id is None
    assert plain.incarnation is None
    assert plain.stats().heartbeats_delivered == plain.stats().heartbeats_dropped == 0
