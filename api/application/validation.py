"""Request validation: upstream's rules for Send's data and type (connection_id's are in
core/ids.py), enforced in code because the .proto files leave out upstream's validation options
(they do not change the wire format)."""

from __future__ import annotations

from conntrack.core.commands import MAX_SEND_BYTES, DataType


def send_problem(data: bytes, data_type: int) -> str | None:
    """Why a Send's data or type is invalid (upstream: data required, at most 131072 bytes; the
    type BINARY or TEXT, and a TEXT frame valid UTF-8, as WebSocket requires), or None."""
    if not data:
        return "data is required"
    if len(data) > MAX_SEND_BYTES:
        return f"data must be at most {MAX_SEND_BYTES} bytes, got {len(data)}"
    if data_type not in (DataType.BINARY, DataType.TEXT):
        return "type must be BINARY or TEXT"
    if data_type == DataType.TEXT:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"data of a TEXT frame must be valid UTF-8 (byte {exc.start} is not)"
    return None
