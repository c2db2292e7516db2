"""core/ids.py: the one rule for ids, and upstream's for ConnectionService's connection_id."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from conntrack.core.ids import (
    MAX_ID_LENGTH,
    UPSTREAM_CONNECTION_ID_LENGTH,
    id_problem,
    is_valid_id,
    upstream_connection_id_problem,
)


@given(st.text(max_size=MAX_ID_LENGTH + 5))
@example("")
@example("x" * MAX_ID_LENGTH)
@example("x" * (MAX_ID_LENGTH + 1))
@example("a\x00b")
def test_the_predicate_and_the_message_agree(value: str) -> None:
    problem = id_problem("node_id", value)
    assert (problem is None) == is_valid_id(value)
    assert (problem is None) == (0 < len(value) <= MAX_ID_LENGTH and "\x00" not in value)
    if problem is not None:
        assert problem.startswith("node_id ")


def test_messages_name_the_field_and_the_limit() -> None:
    assert id_problem("gateway_id", "") == "gateway_id is required"
    assert id_problem("gateway_id", "", required=False) is None
    assert id_problem("gateway_id", "g" * 256) == (
        "gateway_id must be at most 255 characters, got 256"
    )
    assert id_problem("gateway_id", "g\x00") == "gateway_id must not contain NUL"
    assert id_problem("gateway_id", "g\x00", check_nul=False) is None


@given(st.text(max_size=UPSTREAM_CONNECTION_ID_LENGTH + 5))
def test_upstream_connection_id_rule_is_length_only(value: str) -> None:
    problem = upstream_connection_id_problem(value)
    assert (problem is None) == (0 < len(value) <= UPSTREAM_CONNECTION_ID_LENGTH)
