"""Principals and labels: their limits, the messages that name what is wrong, and the stored
form."""

from __future__ import annotations

import re

import pytest

from conntrack.core.events import Connected, Event, InvalidEvent
from conntrack.core.labels import (
    MAX_LABELS,
    from_json,
    labels_problem,
    normalized,
    principal_problem,
    to_json,
)
from conntrack.producer.validation import checked_value

T0 = 1_764_300_000_000_000_000


@pytest.mark.parametrize(
    ("labels", "problem"),
    [
        ({}, None),
        ({"tenant": "acme", "app.version/major": "3", "a": ""}, None),
        ({f"k{i}": "v" for i in range(MAX_LABELS)}, None),
        ({f"k{i}": "v" for i in range(MAX_LABELS + 1)}, "at most 16 labels, got 17"),
        ({"": "v"}, "labels has an empty key"),
        ({"-lead": "v"}, "starting with a letter or digit"),
        ({"with space": "v"}, "letters, digits and . _ - /"),
        ({"k" * 64: "v"}, "key must be at most 63 characters, got 64"),
        ({"k": "v" * 256}, r"labels\[k\] must be at most 255 characters, got 256"),
        ({"k": "a\x00"}, r"labels\[k\] must not contain NUL"),
    ],
)
def test_label_limits(labels: dict[str, str], problem: str | None) -> None:
    found = labels_problem("labels", labels)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert re.search(problem, found), found


def test_a_key_given_twice_is_named() -> None:
    assert labels_problem("labels", [("k", "a"), ("k", "b")]) == "labels has the key 'k' twice"


def test_principal_limits() -> None:
    assert principal_problem("principal", "") is None
    assert principal_problem("principal", "u" * 255) is None
    assert principal_problem("principal", "u" * 256) == (
        "principal must be at most 255 characters, got 256"
    )
    assert principal_problem("principal", "a\x00") == "principal must not contain NUL"


def test_stored_form_is_canonical_and_round_trips() -> None:
    labels = normalized({"tenant": "ä", "device": "ios"})
    assert labels == (("device", "ios"), ("tenant", "ä"))
    assert to_json(labels) == '{"device":"ios","tenant":"ä"}'
    assert from_json(to_json(labels)) == {"device": "ios", "tenant": "ä"}
    assert to_json(()) is None
    assert from_json(None) == {}


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (Connected("::1", "ua", principal="p" * 256), "principal must be at most 255"),
        (Connected("::1", "ua", labels=(("bad key", "v"),)), "labels key 'bad key'"),
    ],
)
def test_the_publisher_refuses_a_bad_principal_or_label_naming_the_field(
    payload: Connected, message: str
) -> None:
    with pytest.raises(InvalidEvent, match=message):
        checked_value(Event("e", "c", "gw", T0, payload))
