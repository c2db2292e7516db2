"""What the kernel says about processes: CPU time and peak memory, read from /proc (Linux).

Reading /proc directly keeps the harness free of a dependency for five numbers; CPU is given as
"cores busy" over a measured window (1.0 = one core fully used), so it reads the same on any
machine."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
_PROC = Path("/proc")
COARSE_WINDOW_S = 1.0


def process_cpu_seconds(pid: int, *, reaped_children: bool = False) -> float | None:
    """User + system CPU seconds of one process so far, with reaped_children also those of its
    children that have exited and been waited for; None if it is gone."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    own = utime + stime
    return (own + (cutime + cstime if reaped_children else 0)) / _TICKS_PER_SECOND


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM (the resident set's high-water mark) in MB (10^6 bytes); None if it is gone."""
    return _status_kb(pid, "VmHWM")


def rss_mb(pid: int) -> float | None:
    return _status_kb(pid, "VmRSS")


def _status_kb(pid: int, field: str) -> float | None:
    try:
        for line in (_PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / 1e6  # the kernel's kB are KiB
    except OSError:
        return None
    return None


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs together."""
    first = (_PROC / "stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in first[:8]]  # user nice system idle iowait irq softirq steal
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def _pids_matching(predicate: Callable[[str, str], bool]) -> list[int]:
    """PIDs whose (comm, cmdline) satisfy predicate; processes that vanish are skipped."""
    out = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if predicate(comm, cmdline):
            out.append(int(entry.name))
    return out


def children(pid: int) -> list[int]:
    """The live child processes of pid (one level down)."""
    out = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:  # field 4, ppid
            out.append(int(entry.name))
    return out


def postgres_pids() -> list[int]:
    return _pids_matching(lambda comm, _cmd: comm.startswith("postgres"))


def kafka_pids() -> list[int]:
    return _pids_matching(lambda comm, cmd: comm == "java" and "kafka.Kafka" in cmd)


@dataclass(frozen=True)
class CpuUse:
    """Cores busy over a window, per process group (1.0 = one core fully used)."""

    seconds: float
    cores: dict[str, float]

    @property
    def coarse(self) -> bool:
        """Counters tick every 10 ms: over a short window the figures are rough."""
        return self.seconds < COARSE_WINDOW_S

    def as_dict(self) -> dict[str, float]:
        return {
            "window_s": round(self.seconds, 3),
            **{k: round(v, 3) for k, v in self.cores.items()},
        }


class CpuWindow:
    """Snapshot CPU counters now; finish() gives the cores each group kept busy since.

    Groups: `machine` (all CPUs), `harness` (this process), `postgres` and `kafka` (the servers,
    found by name; a server process that starts inside the window counts from zero, one that
    exits inside it is missed), and the named PIDs passed in (e.g. a server subprocess) with
    their live children (a child that exits inside the window counts from its start: its time
    shows in the parent's reaped-children figure, so a window where workers die reads high)."""

    def __init__(self, pids: Mapping[str, int] | None = None) -> None:
        self._named = dict(pids or {})
        self._start = self._snapshot()
        self._started_at = time.perf_counter()

    def _snapshot(self) -> dict[str, dict[int, float]]:
        busy, _total = _machine_ticks()
        snap: dict[str, dict[int, float]] = {
            "machine": {0: busy / _TICKS_PER_SECOND},
            "harness": {0: _own_cpu(resource.RUSAGE_SELF)},
            "postgres": _group(postgres_pids()),
            "kafka": _group(kafka_pids()),
        }
        for name, pid in self._named.items():
            # With its live children: the workers of `conntrack-api serve` (or of the constant
            # server) are the server as much as their supervisor is.
            snap[name] = _group([pid, *children(pid)])
        return snap

    def finish(self) -> CpuUse:
        elapsed = max(time.perf_counter() - self._started_at, 1e-9)
        end = self._snapshot()
        cores: dict[str, float] = {}
        for name, now in end.items():
            if not now and not self._start.get(name):
                continue  # e.g. no Kafka broker process on this machine (a remote one)
            before = self._start.get(name, {})
            cores[name] = sum(v - before.get(pid, 0.0) for pid, v in now.items()) / elapsed
        return CpuUse(elapsed, cores)


def _group(pids: list[int]) -> dict[int, float]:
    # With the time of reaped children: a PostgreSQL backend whose client disconnects inside the
    # window (a load generator cancelling its last calls makes the API close the connection of
    # a lookup) exits before the closing snapshot, and its CPU then shows only in the
    # postmaster's counters. Live children are listed on their own, so nothing counts twice.
    out = {}
    for pid in pids:
        seconds = process_cpu_seconds(pid, reaped_children=True)
        if seconds is not None:
            out[pid] = seconds
    return out


def _own_cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def cpu_count() -> int:
    return os.cpu_count() or 1
