"""A real OpenTelemetry Collector for tests (infra/otelcol.sh: the collector's OTLP receiver, the
contrib file exporter), and the spans it wrote, read back from its OTLP JSON lines."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.ports import free_port
from tests.support.repo import REPO

OTELCOL_SH = REPO / "infra" / "otelcol.sh"

# OTLP's span kinds, as its JSON encoding numbers them.
INTERNAL, SERVER, CLIENT, PRODUCER, CONSUMER = 1, 2, 3, 4, 5


@dataclass(frozen=True)
class ExportedSpan:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    links: tuple[tuple[str, str], ...]  # (trace id, span id)
    attributes: dict[str, object]


@dataclass
class Collector:
    endpoint: str
    spans_file: Path
    log_file: Path

    def spans(self) -> list[ExportedSpan]:
        if not self.spans_file.exists():
            return []
        found: list[ExportedSpan] = []
        # Only whole lines: the collector may be writing the last one.
        for line in self.spans_file.read_text().split("\n")[:-1]:
            if not line.strip():
                continue
            for resource_spans in json.loads(line).get("resourceSpans", ()):
                service = _attributes(resource_spans.get("resource", {})).get("service.name", "")
                for scope_spans in resource_spans.get("scopeSpans", ()):
                    for span in scope_spans.get("spans", ()):
                        found.append(
                            ExportedSpan(
                                service=str(service),
                                name=span["name"],
                                kind=int(span.get("kind", 0)),
                                trace_id=span["traceId"],
                                span_id=span["spanId"],
                                parent_id=span.get("parentSpanId", ""),
                                links=tuple(
                                    (link["traceId"], link["spanId"])
                                    for link in span.get("links", ())
                                ),
                                attributes=_attributes(span),
                            )
                        )
        return found

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""


def _attributes(holder: dict[str, object]) -> dict[str, object]:
    values: dict[str, object] = {}
    for item in holder.get("attributes", ()):  # type: ignore[attr-defined]
        value = item["value"]
        values[item["key"]] = next(iter(value.values()), None) if value else None
    return values


@contextlib.contextmanager
def running_collector(tmp_path: Path) -> Iterator[Collector]:
    port = free_port()
    collector = Collector(
        f"http://127.0.0.1:{port}", tmp_path / "spans.jsonl", tmp_path / "otelcol.log"
    )
    build = subprocess.run(
        ["bash", str(OTELCOL_SH), "build"], capture_output=True, text=True, timeout=900
    )
    if build.returncode != 0:
        reason = f"the collector could not be built: {build.stdout}{build.stderr}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    with collector.log_file.open("wb") as log:
        process = subprocess.Popen(
            ["bash", str(OTELCOL_SH), "run", str(collector.spans_file), str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert process.poll() is None, collector.log()
            assert time.monotonic() < deadline, collector.log()
            time.sleep(0.1)
        yield collector
    finally:
        process.terminate()
        process.wait(30)
