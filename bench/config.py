"""The knobs of a run and the sizes each scenario derives from --scale.

At --scale 1 every size is the one the issue names (1M events, 100k live connections, 1M live
connections, 10k events/s); smaller scales shrink counts and durations (never below a floor
that still exercises the whole path), so the harness itself can be tested in seconds."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

DEFAULT_KAFKA: Final = "127.0.0.1:19092"
# What `infra/postgres.sh url` prints: the server's maintenance database, used to create and
# drop the per-scenario databases.
DEFAULT_POSTGRES_URL: Final = "postgresql+asyncpg://conntrack@127.0.0.1:55432/conntrack"


@dataclass(frozen=True)
class BenchConfig:
    scale: float = 1.0
    kafka: str = DEFAULT_KAFKA
    postgres_url: str = DEFAULT_POSTGRES_URL
    # A streaming replica of postgres_url's server (infra/postgres.sh replica url): the Get
    # scenario's API then reads from it (CONNTRACK_API_READ_DATABASE_URLS).
    get_replica_url: str | None = None
    partitions: int = 6  # what `conntrack-producer topics` creates by default
    seed: int = 1
    get_concurrency: int = 32
    get_seconds_override: float | None = None
    freshness_rate: int = 10_000
    freshness_seconds_override: float | None = None
    freshness_probes_per_second: float = 25.0
    send_rate: int = 1_000
    send_seconds_override: float | None = None
    send_clients_override: int | None = None
    rebuild_events_override: int | None = None
    naive_seconds_override: float | None = None
    load_generator: str = "auto"  # auto | ghz | python
    ghz_path: str | None = None
    loadgen_processes: int = 2
    work_dir: Path = Path("bench-results/work")

    @classmethod
    def from_environment(cls, **overrides: object) -> BenchConfig:
        """Defaults, then CONNTRACK_BENCH_KAFKA / CONNTRACK_BENCH_POSTGRES_URL, then flags."""
        env: dict[str, object] = {}
        if os.environ.get("CONNTRACK_BENCH_KAFKA"):
            env["kafka"] = os.environ["CONNTRACK_BENCH_KAFKA"]
        if os.environ.get("CONNTRACK_BENCH_POSTGRES_URL"):
            env["postgres_url"] = os.environ["CONNTRACK_BENCH_POSTGRES_URL"]
        if os.environ.get("CONNTRACK_BENCH_GET_REPLICA_URL"):
            env["get_replica_url"] = os.environ["CONNTRACK_BENCH_GET_REPLICA_URL"]
        env.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**env)  # type: ignore[arg-type]

    def _n(self, full: int, floor: int) -> int:
        return max(floor, round(full * self.scale))

    def _s(self, full: float, floor: float) -> float:
        return max(floor, full * self.scale)

    # Projector throughput (both mixes)
    @property
    def throughput_events(self) -> int:
        return self._n(1_000_000, 2_000)

    @property
    def naive_events(self) -> int:
        """The naive projector commits once per event, so it runs over a prefix of the topic."""
        return min(self.throughput_events, self._n(20_000, 300))

    @property
    def naive_seconds(self) -> float:
        return self.naive_seconds_override or self._s(30.0, 3.0)

    # Rebuild
    @property
    def rebuild_events(self) -> int:
        return self.rebuild_events_override or self._n(1_000_000, 2_000)

    # Get
    @property
    def get_rows(self) -> int:
        return self._n(100_000, 1_000)

    @property
    def get_seconds(self) -> float:
        return self.get_seconds_override or self._s(10.0, 1.0)

    # Freshness
    @property
    def freshness_seconds(self) -> float:
        return self.freshness_seconds_override or self._s(20.0, 2.0)

    # Send
    @property
    def send_seconds(self) -> float:
        return self.send_seconds_override or self._s(20.0, 1.0)

    @property
    def send_clients(self) -> int:
        return self.send_clients_override or self._n(1_000, 10)

    @property
    def send_max_seconds(self) -> float:
        """Length of each closed-loop run measuring the most sends/s."""
        return self._s(5.0, 0.5)

    # Memory
    @property
    def memory_connections(self) -> int:
        return self._n(1_000_000, 1_000)

    @property
    def memory_get_seconds(self) -> float:
        return self._s(5.0, 1.0)
