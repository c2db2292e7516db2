"""The reference gateway's header handling, without a broker: a User-Agent that is not ASCII
must still become a Connected event (it was refused at encoding, and the socket closed with
1011, because websockets hands non-ASCII header bytes over as lone surrogates)."""

from __future__ import annotations

import pytest

from conntrack.core.events import Connected, Event, decode, encode
from conntrack.gateway.server import header_text


def as_websockets_gives_it(raw: bytes) -> str:
    """How websockets decodes a header value (websockets/http11.py, parse_headers)."""
    return raw.decode("ascii", "surrogateescape")


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"Mozilla/5.0 (X11; Linux x86_64)", "Mozilla/5.0 (X11; Linux x86_64)"),
        ("gateway-e2e/1.0 ✓ Жук".encode(), "gateway-e2e/1.0 ✓ Жук"),
        (b"latin-1 \xe9t\xe9", "latin-1 \ufffdt\ufffd"),  # obs-text that is not UTF-8
        (b"n\x00ul", "nul"),
        (b"", ""),
    ],
)
def test_a_header_value_becomes_text_an_event_carries(raw: bytes, text: str) -> None:
    value = header_text(as_websockets_gives_it(raw))
    assert value == text
    event = Event("e", "c", "gw", 1_764_300_000_000_000_000, Connected("127.0.0.1", value))
    assert decode(encode(event), b"c") == event
