"""Identifiers: the one home of their limits and of their validation.

Every id the tracker stores or carries (event, connection, gateway and node ids, and the ids in
commands and directory requests) is non-empty, at most MAX_ID_LENGTH code points (the read
model's id columns are that wide) and free of NUL (PostgreSQL text cannot hold it).
ConnectionService's `connection_id` follows upstream's rule instead: required and at most
UPSTREAM_CONNECTION_ID_LENGTH code points, nothing else, so an id the tracker could never have
stored is a well-formed request that is simply not found.
"""

from __future__ import annotations

from typing import Final

MAX_ID_LENGTH: Final = 255
UPSTREAM_CONNECTION_ID_LENGTH: Final = 50


def id_problem(
    name: str, value: str, *, required: bool = True, check_nul: bool = True
) -> str | None:
    """Why `value` is not a valid id (a message naming the field `name`), or None. An empty
    value is valid when not `required`; `check_nul=False` leaves NUL to a caller that checks
    every text field of a record at once (the event decoder)."""
    if not value:
        return f"{name} is required" if required else None
    if len(value) > MAX_ID_LENGTH:
        return f"{name} must be at most {MAX_ID_LENGTH} characters, got {len(value)}"
    if check_nul and "\x00" in value:
        return f"{name} must not contain NUL"
    return None


def is_valid_id(value: str) -> bool:
    """id_problem(...) is None, without building a message: for the decoders' hot paths."""
    return bool(value) and len(value) <= MAX_ID_LENGTH and "\x00" not in value


def upstream_connection_id_problem(connection_id: str) -> str | None:
    """Why a ConnectionService `connection_id` is invalid, or None. Length counts Unicode code
    points, as upstream's "<=50" on a string does."""
    if not connection_id:
        return "connection_id is required"
    if len(connection_id) > UPSTREAM_CONNECTION_ID_LENGTH:
        return (
            f"connection_id must be at most {UPSTREAM_CONNECTION_ID_LENGTH} characters, "
            f"got {len(connection_id)}"
        )
    return None
