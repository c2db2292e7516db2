"""Nanosecond timestamps: the read model stores times as integer nanoseconds since the Unix
epoch, which is exact on every backend (SQL timestamp types stop at microseconds)."""

from __future__ import annotations

import functools
import time

from google.protobuf.timestamp_pb2 import Timestamp

NANOS_PER_SECOND = 1_000_000_000


def to_ns(ts: Timestamp) -> int:
    return ts.seconds * NANOS_PER_SECOND + ts.nanos


def to_timestamp(ns: int) -> Timestamp:
    seconds, nanos = divmod(ns, NANOS_PER_SECOND)
    return Timestamp(seconds=seconds, nanos=nanos)


def format_rfc3339(ns: int) -> str:
    """RFC 3339 in UTC with nine fractional digits always, e.g. 2026-11-28T02:07:00.000000000Z:
    a fixed shape, and cheap (the lifecycle stream stamps every record with one)."""
    seconds, nanos = divmod(ns, NANOS_PER_SECOND)
    return f"{_second(seconds)}.{nanos:09d}Z"


@functools.lru_cache(maxsize=64)
def _second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def format_ns(ns: int) -> str:
    """RFC 3339 with all nine fractional digits, e.g. 2026-11-28T02:07:00.123456789Z."""
    return to_timestamp(ns).ToJsonString() if ns % NANOS_PER_SECOND == 0 else _full(ns)


def _full(ns: int) -> str:
    seconds, nanos = divmod(ns, NANOS_PER_SECOND)
    base = Timestamp(seconds=seconds).ToJsonString()[:-1]  # strip "Z"
    return f"{base}.{nanos:09d}Z"
