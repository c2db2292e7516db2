"""core/timeutil.py: nanosecond times and their RFC 3339 forms."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from conntrack.core.events import MAX_TIME_NS, MIN_TIME_NS
from conntrack.core.timeutil import NANOS_PER_SECOND, format_ns, format_rfc3339, to_ns, to_timestamp

times = st.integers(MIN_TIME_NS, MAX_TIME_NS - 1)


@given(times)
def test_the_fixed_form_is_the_same_instant_as_the_protobuf_form(ns: int) -> None:
    fixed = format_rfc3339(ns)
    assert len(fixed) == len("2026-11-28T02:07:00.123456789Z")
    seconds, nanos = divmod(ns, NANOS_PER_SECOND)
    parsed = datetime.strptime(fixed[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    assert int(parsed.timestamp()) == seconds
    assert int(fixed[20:29]) == nanos
    assert to_ns(to_timestamp(ns)) == ns
    # The same instant as format_ns() writes it (which drops a zero fraction).
    assert fixed.startswith(format_ns(ns).removesuffix("Z").split(".")[0])
