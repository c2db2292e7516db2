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


# Close codes an application may send (RFC 6455, 7.4): normal closure, and the registered and
# private ranges.
_MAX_CLOSE_REASON_BYTES = 123


def close_problem(status_code: int, reason: str) -> str | None:
    """Why a close code or reason cannot go in a close frame, or None (0 stands for 1000)."""
    if status_code not in (0, 1000) and not 3000 <= status_code <= 4999:
        return f"status_code must be 1000 or 3000-4999, got {status_code}"
    if len(reason.encode()) > _MAX_CLOSE_REASON_BYTES:
        return f"reason must be at most {_MAX_CLOSE_REASON_BYTES} bytes of UTF-8"
    return None
