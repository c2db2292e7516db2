"""What a benchmark run produces: figures beside their ceilings, target verdicts, the printed
table and the JSON document (its shape is checked by tests/integration/test_bench_smoke.py)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from bench.procstat import COARSE_WINDOW_S

SCHEMA: Final = "conntrack-bench/1"


@dataclass
class Figure:
    """One measured number, optionally beside the ceiling it is compared with.

    ratio = value / ceiling. For "higher is better" figures (rates) the ceiling is the faster
    reference, so a ratio near 1 is good; the naive projector is a floor, not a ceiling, and
    its ratio reads as a speed-up."""

    key: str  # stable machine name, e.g. "events_per_s"
    label: str
    value: float
    unit: str
    ceiling: float | None = None
    ceiling_label: str = ""
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.ceiling is None or self.ceiling == 0:
            return None
        return self.value / self.ceiling

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = None if self.ratio is None else round(self.ratio, 4)
        return d


@dataclass
class TargetCheck:
    """A target of the issue beside what was measured. met is None when the run cannot judge
    it (e.g. a size-bound target at a reduced --scale)."""

    target: str
    measured: str
    met: bool | None
    note: str = ""

    @property
    def verdict(self) -> str:
        return {True: "met", False: "NOT met", None: "n/a"}[self.met]


@dataclass
class ScenarioResult:
    name: str
    status: str = "ok"  # "ok" or "error"
    seconds: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)
    figures: list[Figure] = field(default_factory=list)
    targets: list[TargetCheck] = field(default_factory=list)
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def figure(self, key: str) -> Figure:
        for f in self.figures:
            if f.key == key:
                return f
        raise KeyError(key)

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "params": self.params,
            "figures": [f.as_dict() for f in self.figures],
            "targets": [{**asdict(t), "verdict": t.verdict} for t in self.targets],
            "cpu": self.cpu,
            "notes": self.notes,
            "error": self.error,
        }


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), math.ceil(pct / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


def add_latency_figures(
    result: ScenarioResult,
    prefix: str,
    label: str,
    latencies_ms: list[float],
    baseline_ms: list[float],
    baseline_label: str,
) -> Figure:
    """p50, p99 and max of ascending latencies (keys `<prefix>p50_ms`, ...), the percentiles
    beside the same ones of the baseline measured in the same run; returns the p99 figure."""
    for pct in (50, 99):
        figure = result.add(
            Figure(
                f"{prefix}p{pct}_ms",
                f"{label} p{pct}",
                percentile(latencies_ms, pct),
                "ms",
                percentile(baseline_ms, pct) if baseline_ms else None,
                baseline_label,
            )
        )
    result.add(Figure(f"{prefix}max_ms", f"{label} max", latencies_ms[-1], "ms"))
    return figure


def at_least(value: float, threshold: float, text: str, unit: str = "") -> TargetCheck:
    return TargetCheck(text, f"{fmt(value)}{unit}", value >= threshold)


def at_most(value: float, threshold: float, text: str, unit: str = "") -> TargetCheck:
    return TargetCheck(text, f"{fmt(value)}{unit}", value <= threshold)


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = (
        [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        if rows
        else [len(h) for h in headers]
    )
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def render(document: dict[str, Any], results: list[ScenarioResult]) -> str:
    meta = document["meta"]
    parts = [
        f"conntrack benchmark  scale={meta['scale']}  cpus={meta['host']['cpus']}  "
        f"load generator={meta['load_generator']}  {meta['started_at']}"
    ]
    if meta.get("postgres_settings"):
        parts[0] += "\nPostgreSQL: " + ", ".join(
            f"{k}={v}" for k, v in meta["postgres_settings"].items()
        )
    if meta["scale"] != 1:
        parts.append(
            "NOTE: the targets are defined at full size (--scale 1); at this scale the "
            "verdicts are indicative only."
        )
    figure_rows = []
    for r in results:
        if r.status != "ok":
            figure_rows.append([r.name, "ERROR", (r.error or "")[:70], "", ""])
            continue
        for f in r.figures:
            ratio = "" if f.ratio is None else f"{f.ratio:.2f}x"
            ceiling = "" if f.ceiling is None else f"{fmt(f.ceiling)} {f.unit} ({f.ceiling_label})"
            figure_rows.append([r.name, f.label, f"{fmt(f.value)} {f.unit}", ceiling, ratio])
    parts.append(_table(["scenario", "figure", "value", "beside (same run)", "ratio"], figure_rows))
    target_rows = [
        [r.name, t.target, t.measured, t.verdict + (f" ({t.note})" if t.note else "")]
        for r in results
        for t in r.targets
    ]
    if target_rows:
        parts.append(_table(["scenario", "target", "measured", "verdict"], target_rows))
    cpu_rows = [
        [
            r.name,
            f"{window} ({use.get('window_s', 0):.1f}s)",
            ", ".join(f"{k} {v:.2f}" for k, v in use.items() if k != "window_s")
            + (" (coarse: short window)" if use.get("window_s", 0) < COARSE_WINDOW_S else ""),
        ]
        for r in results
        for window, use in r.cpu.items()
    ]
    if cpu_rows:
        parts.append(_table(["scenario", "CPU window", "cores busy"], cpu_rows))
    notes = [f"[{r.name}] {n}" for r in results for n in r.notes]
    if notes:
        parts.append("Notes:\n" + "\n".join(f"  {n}" for n in notes))
    return "\n\n".join(parts)


def document(meta: dict[str, Any], results: list[ScenarioResult]) -> dict[str, Any]:
    return {"schema": SCHEMA, "meta": meta, "scenarios": [r.as_dict() for r in results]}


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
