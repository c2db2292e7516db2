"""Container healthcheck of the projector: exit 0 only while it does its job, i.e. consumes.

Run by docker-compose.yml inside the projector's container (the image copies this file to
/opt/conntrack/). It reads the projector's own Prometheus page (docs/projector.md, Monitoring)
and answers unhealthy (exit 1, the reason on stdout, which `docker inspect` shows) when:

- the page does not answer (the process is gone or wedged);
- `conntrack_projector_assigned_partitions` is missing or 0: the process owns no partition of the
  events topic, so it projects nothing (not yet joined, fenced out, or an idle extra replica);
- some owned partition lags (`conntrack_projector_lag` > 0) and no batch has been committed
  (`conntrack_projector_batches_total` unchanged) since the previous check: it is stuck, e.g.
  retrying against an unreachable database or broker.

The previous check's batch count is kept in a small state file (CONNTRACK_HEALTHCHECK_STATE,
default /tmp/conntrack-projector-health.json). The first check after a (re)start has nothing to
compare with and only requires owned partitions. Compose's `retries` decide how many stuck
intervals in a row make the container unhealthy.

What metrics cannot show: a loop that hangs while its lag gauge reads 0 (the gauge is only
refreshed by the loop itself) looks healthy until the next check that sees lag.

Standard library plus prometheus_client (a runtime dependency, so it is in the image).
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ASSIGNED = "conntrack_projector_assigned_partitions"
LAG = "conntrack_projector_lag"
BATCHES = "conntrack_projector_batches_total"
DEFAULT_STATE = "/tmp/conntrack-projector-health.json"


def scrape(url: str, timeout_s: float) -> dict[str, float]:
    """Sample name -> value; labelled samples of one name are summed (lag over partitions)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text = response.read().decode("utf-8")
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def verdict(now: dict[str, float], previous_batches: float | None) -> str | None:
    """None when healthy, else the reason."""
    if now.get(ASSIGNED, 0.0) <= 0:
        return f"{ASSIGNED} is {now.get(ASSIGNED, 'missing')}: no partition to consume"
    if BATCHES not in now:
        return f"{BATCHES} missing: not the projector's metrics page?"
    lag = now.get(LAG, 0.0)
    if lag > 0 and previous_batches is not None and now[BATCHES] == previous_batches:
        return f"stuck: lag {lag:.0f} records and no batch committed since the previous check"
    return None


def main() -> int:
    port = os.environ.get("CONNTRACK_METRICS_PORT", "9464")
    url = f"http://127.0.0.1:{port}/metrics"
    state = Path(os.environ.get("CONNTRACK_HEALTHCHECK_STATE", DEFAULT_STATE))
    try:
        now = scrape(url, timeout_s=3.0)
    except (OSError, ValueError) as exc:
        print(f"unhealthy: no metrics from {url}: {exc}")
        return 1
    try:
        previous = json.loads(state.read_text())
        previous_batches = float(previous["batches"])
    except (OSError, ValueError, KeyError, TypeError):
        previous_batches = None
    if BATCHES in now:
        try:
            state.write_text(json.dumps({"batches": now[BATCHES]}))
        except OSError as exc:
            print(f"warning: cannot keep the state in {state}: {exc}")
    reason = verdict(now, previous_batches)
    if reason is not None:
        print(f"unhealthy: {reason}")
        return 1
    print(
        f"healthy: {now[ASSIGNED]:.0f} partitions, lag {now.get(LAG, 0.0):.0f}, "
        f"{now[BATCHES]:.0f} batches"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
