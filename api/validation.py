"""Request validation: upstream's rules for every `connection_id` (required, at most 50
characters, no pattern), enforced in code because the .proto files leave out upstream's
validation options (they do not change the wire format)."""

from __future__ import annotations

from typing import Final

MAX_CONNECTION_ID_LENGTH: Final = 50


def connection_id_problem(connection_id: str) -> str | None:
    """Why this connection_id is invalid (a message naming the field), or None if it is valid.
    Length counts Unicode code points, as upstream's "<=50" on a string does."""
    if not connection_id:
        return "connection_id is required"
    if len(connection_id) > MAX_CONNECTION_ID_LENGTH:
        return (
            f"connection_id must be at most {MAX_CONNECTION_ID_LENGTH} characters, "
            f"got {len(connection_id)}"
        )
    return None
