"""A stored log of schema-version-1 events must keep replaying to the same state, whatever the
event schema becomes (the upcasting path in core/events.py)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from conntrack.core.events import InvalidEvent, decode, upcast
from conntrack.core.fold import fold
from conntrack.core.protogen.conntrack.events.v1 import events_pb2 as pb

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_stored_version_1_events_replay_to_the_recorded_state() -> None:
    records = [json.loads(line) for line in (FIXTURES / "events-v1.jsonl").read_text().splitlines()]
    events = [decode(base64.b64decode(r["value_base64"]), r["key"].encode()) for r in records]
    assert len(events) == 6
    expected = json.loads((FIXTURES / "events-v1.expected.json").read_text())
    # The state recorded when the fixture was made, field for field; a field the state has
    # gained since (a v1 log says nothing of gateway nodes, principals or labels) must hold its
    # "unknown" value.
    replayed = {k: v._asdict() for k, v in fold(events).items()}
    assert replayed.keys() == expected.keys()
    for cid, state in replayed.items():
        assert {name: state[name] for name in expected[cid]} == expected[cid]
        assert {name: value for name, value in state.items() if name not in expected[cid]} == {
            "node_id": None,
            "node_incarnation": None,
            "principal": None,
            "labels": None,
        }


@pytest.mark.parametrize(("version", "message"), [(0, "missing"), (99, "newer than this reader")])
def test_unknown_schema_versions_are_rejected_with_a_reason(version: int, message: str) -> None:
    with pytest.raises(InvalidEvent, match=message):
        upcast(pb.ConnectionEvent(schema_version=version))


def test_an_old_version_is_upcast_step_by_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend the schema moved to version 2, whose upcaster rewrites the user agent: v1
    records then pass through it on replay."""
    import conntrack.core.events as events

    seen: list[int] = []

    def v1_to_v2(msg: pb.ConnectionEvent) -> pb.ConnectionEvent:
        seen.append(msg.schema_version)
        if msg.HasField("connected"):
            msg.connected.identity.user_agent = "upcast:" + msg.connected.identity.user_agent
        return msg

    monkeypatch.setattr(events, "SCHEMA_VERSION", 2)
    monkeypatch.setitem(events.UPCASTERS, 1, v1_to_v2)
    first = json.loads((FIXTURES / "events-v1.jsonl").read_text().splitlines()[0])
    event = decode(base64.b64decode(first["value_base64"]), b"conn-a")
    assert seen == [1]
    assert getattr(event.payload, "user_agent", "").startswith("upcast:Mozilla")
    monkeypatch.delitem(events.UPCASTERS, 1)
    with pytest.raises(InvalidEvent, match="no upcaster from schema_version 1"):
        decode(base64.b64decode(first["value_base64"]), b"conn-a")
