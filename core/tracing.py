"""Traces across Kafka, on the OpenTelemetry API (the SDK that exports them is started by
core/tracing_setup.py, only when tracing is configured).

The W3C trace context travels in record headers (`traceparent`, `tracestate`); spans follow
OpenTelemetry's messaging conventions: a PRODUCER span `send <topic>` for each record sent within
a traced operation (a command from an API call, its outcome, a socket's Connected or
Disconnected), a CONSUMER span `process <topic>` for each command a node executes (a child of the
API's), and a projector batch's span linked to the events it applies (a batch applies the events
of many traces). Kafka is traced here rather than by the aiokafka instrumentation, which opens a
span for every record a consumer reads: every API process reads every outcome, and the projector
reads thousands of events a second.

With tracing off (no SDK tracer provider installed: the default) every helper returns at its
first check, so the hot paths pay one attribute lookup and a comparison.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Final

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind

_TRACER: Final = "conntrack"
_CONTEXT_HEADERS: Final = frozenset({"traceparent", "tracestate"})
# A batch span links to at most this many events (the SDK's default limit of links per span).
MAX_LINKS: Final = 128

Headers = Sequence[tuple[str, bytes]]


def installed() -> bool:
    """Whether an SDK tracer provider is installed (tracing is on)."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def tracer() -> trace.Tracer:
    return trace.get_tracer(_TRACER)


def span(name: str, **attributes: Any) -> contextlib.AbstractContextManager[Span | None]:
    """An INTERNAL span, the current one's child; nothing when tracing is off."""
    if not installed():
        return contextlib.nullcontext()
    return tracer().start_as_current_span(name, attributes=attributes)


def sending(topic: str, key: str) -> contextlib.AbstractContextManager[list[tuple[str, bytes]]]:
    """A PRODUCER span for one record sent within a traced operation, giving the headers that
    carry its context (empty when nothing is traced: tracing off, or no current span). The
    current span may have ended: a node's outcome is sent after its command's span."""
    if not installed() or not trace.get_current_span().get_span_context().is_valid:
        return contextlib.nullcontext([])
    return _sending(topic, key)


@contextlib.contextmanager
def _sending(topic: str, key: str) -> Iterator[list[tuple[str, bytes]]]:
    with tracer().start_as_current_span(
        f"send {topic}",
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": "kafka",
            "messaging.operation.type": "send",
            "messaging.destination.name": topic,
            "messaging.kafka.message.key": key,
        },
    ):
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        yield [(name, value.encode()) for name, value in carrier.items()]


def context_of(headers: Headers | None) -> Context | None:
    """The trace context a record's headers carry, if any."""
    carrier = {
        name: value.decode("latin-1") for name, value in headers or () if name in _CONTEXT_HEADERS
    }
    return propagate.extract(carrier) if carrier else None


def processing(
    topic: str, headers: Headers | None, **attributes: Any
) -> contextlib.AbstractContextManager[Span | None]:
    """A CONSUMER span for acting on one record, the child of the context its headers carry
    (a new trace without one); nothing when tracing is off."""
    if not installed():
        return contextlib.nullcontext()
    return tracer().start_as_current_span(
        f"process {topic}",
        context=context_of(headers),
        kind=SpanKind.CONSUMER,
        attributes={
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.destination.name": topic,
            **attributes,
        },
    )


def links(headers_of_records: Iterable[Headers | None]) -> list[Link]:
    """Links to the traces of the records that carry one, at most MAX_LINKS."""
    found: list[Link] = []
    for headers in headers_of_records:
        if not headers:
            continue
        context = context_of(headers)
        if context is None:
            continue
        span_context = trace.get_current_span(context).get_span_context()
        if span_context.is_valid:
            found.append(Link(span_context))
            if len(found) == MAX_LINKS:
                break
    return found


def applying(
    topic: str, headers_of_records: Callable[[], Iterable[Headers | None]], count: int
) -> contextlib.AbstractContextManager[Span | None]:
    """A CONSUMER span for applying a batch of records, linked to the traces of those that
    carry one (their headers are only read when tracing is on)."""
    if not installed():
        return contextlib.nullcontext()
    return tracer().start_as_current_span(
        f"process {topic}",
        kind=SpanKind.CONSUMER,
        links=links(headers_of_records()),
        attributes={
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.destination.name": topic,
            "messaging.batch.message_count": count,
        },
    )
