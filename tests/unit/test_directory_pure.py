"""api/application/directory.py's pure parts: the page token codec, filter and page-size validation;
and core/liveness.py's bounds, which the directory's SQL is built from."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conntrack.api.application.directory import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    InvalidDirectoryRequest,
    decode_page_token,
    directory_filter,
    encode_page_token,
    filter_from_proto,
    page_size_of,
)
from conntrack.api.read.repository import DirectoryFilter
from conntrack.core.fold import NodeState
from conntrack.core.liveness import Liveness
from conntrack.core.protogen.conntrack.directory.v1 import directory_pb2

GW = DirectoryFilter("gw-1")
ids = st.text(min_size=1, max_size=255).filter(lambda s: "\x00" not in s)


@given(ids)
def test_a_token_gives_back_the_last_id_for_the_same_query(last_id: str) -> None:
    token = encode_page_token(GW, last_id)
    assert token.isascii()
    assert not set(token) & set("=+/")
    assert decode_page_token(GW, token) == last_id


def test_the_empty_token_is_the_first_page() -> None:
    assert decode_page_token(GW, "") is None


@pytest.mark.parametrize(
    "other",
    [
        DirectoryFilter("gw-2"),
        DirectoryFilter("gw-1", node_id="n"),
        DirectoryFilter("gw-1", source_ip="10.0.0.1"),
        DirectoryFilter("gw-1", last_active_before_ns=1),
        DirectoryFilter("gw-1", connected_before_ns=1),
        DirectoryFilter("gw-1", connected_after_ns=1),
    ],
)
def test_a_token_of_another_query_is_refused(other: DirectoryFilter) -> None:
    with pytest.raises(InvalidDirectoryRequest, match="page_token is not valid"):
        decode_page_token(other, encode_page_token(GW, "conn-7"))


@given(ids, st.data())
def test_any_change_to_a_token_is_refused(last_id: str, data: st.DataObject) -> None:
    token = encode_page_token(GW, last_id)
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    tampered = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    with pytest.raises(InvalidDirectoryRequest):
        decode_page_token(GW, tampered)


@pytest.mark.parametrize(
    "token",
    ["x", "!!!!", "abc=", "a" * 3000, "ü" * 10, encode_page_token(GW, "c") + "=", "AAAA"],
)
def test_malformed_tokens_are_refused(token: str) -> None:
    with pytest.raises(InvalidDirectoryRequest, match="page_token is not valid"):
        decode_page_token(GW, token)


@given(st.text(max_size=100))
def test_no_text_decodes_into_anything_but_a_refusal(token: str) -> None:
    try:
        decode_page_token(GW, token)
    except InvalidDirectoryRequest:
        return
    assert token == ""


def test_page_size() -> None:
    assert page_size_of(0) == DEFAULT_PAGE_SIZE == 100
    assert page_size_of(1) == 1
    assert page_size_of(MAX_PAGE_SIZE) == MAX_PAGE_SIZE == 1000
    with pytest.raises(InvalidDirectoryRequest, match="at most 1000, got 1001"):
        page_size_of(1001)
    with pytest.raises(InvalidDirectoryRequest, match="negative"):
        page_size_of(-1)


def test_filter_validation() -> None:
    assert directory_filter("gw", node_id="", source_ip="") == DirectoryFilter("gw")
    assert directory_filter("gw", node_id="n", source_ip="::1") == DirectoryFilter(
        "gw", node_id="n", source_ip="::1"
    )
    cases: list[tuple[dict[str, Any], str]] = [
        ({"gateway_id": ""}, "gateway_id is required"),
        ({"gateway_id": "g" * 256}, "gateway_id must be at most 255"),
        ({"gateway_id": "g\x00"}, "gateway_id must not contain NUL"),
        ({"node_id": "n" * 256}, "filter.node_id must be at most 255"),
        ({"source_ip": "1" * 1025}, "filter.source_ip must be at most 1024"),
        ({"source_ip": "1\x00"}, "filter.source_ip must not contain NUL"),
        ({"connected_after_ns": 2**63}, "filter.connected_after is out of range"),
        ({"last_active_before_ns": -(2**63) - 1}, "filter.last_active_before is out of range"),
    ]
    for kwargs, message in cases:
        args: dict[str, Any] = {"gateway_id": "gw", **kwargs}
        with pytest.raises(InvalidDirectoryRequest, match=message):
            directory_filter(**args)


def test_filter_from_proto() -> None:
    f = directory_pb2.ConnectionFilter(node_id="n")
    f.connected_after.seconds = 5
    f.last_active_before.nanos = 7
    assert filter_from_proto("gw", f) == DirectoryFilter(
        "gw", node_id="n", connected_after_ns=5_000_000_000, last_active_before_ns=7
    )
    assert filter_from_proto("gw", directory_pb2.ConnectionFilter()) == DirectoryFilter("gw")
    bad = directory_pb2.ConnectionFilter()
    bad.connected_before.nanos = -1
    with pytest.raises(InvalidDirectoryRequest, match=r"connected_before\.nanos"):
        filter_from_proto("gw", bad)
    huge = directory_pb2.ConnectionFilter()
    huge.connected_before.seconds = 10**11
    with pytest.raises(InvalidDirectoryRequest, match="out of range"):
        filter_from_proto("gw", huge)


S = 1_000_000_000
NOW = 1_764_300_000 * S


@given(
    lease=st.sampled_from([0, 30 * S]),
    idle=st.sampled_from([0, 60 * S]),
    lifetime=st.sampled_from([0, 3600 * S]),
    node_incarnation=st.none() | st.integers(1, 4),
    known=st.none() | st.tuples(st.integers(1, 4), st.integers(0, 60)),
    connected_ago=st.integers(0, 4000),
    active_ago=st.integers(0, 120),
)
def test_node_floor_admits_exactly_what_gone_lets_live(
    lease: int,
    idle: int,
    lifetime: int,
    node_incarnation: int | None,
    known: tuple[int, int] | None,
    connected_ago: int,
    active_ago: int,
) -> None:
    """The directory's SQL uses node_floor() per node (api/read/repository.py); Get uses gone()."""
    rules = Liveness(lease, idle, lifetime)
    nodes = {}
    if known is not None:
        nodes["n"] = NodeState("n", known[0], NOW - 100 * S, NOW - known[1] * S, "gw")
    bounds = rules.bounds(nodes, NOW)
    floor = bounds.node_floor("n")
    node_live = floor is None or (node_incarnation or 0) >= floor
    connected, active = NOW - connected_ago * S, NOW - active_ago * S
    other_live = (bounds.min_last_active_ns is None or active >= bounds.min_last_active_ns) and (
        bounds.min_connected_at_ns is None or connected >= bounds.min_connected_at_ns
    )
    why = rules.gone(
        node_id="n",
        node_incarnation=node_incarnation,
        connected_at_ns=connected,
        last_active_at_ns=active,
        nodes=nodes,
        now_ns=NOW,
    )
    assert (why is None) == (node_live and other_live)
