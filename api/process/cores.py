"""How many API server processes `serve` runs: one per core the process may use (its CPU
affinity, and its cgroup's quota in a container), or the api_workers setting."""

from __future__ import annotations

import math
import os
from pathlib import Path

from conntrack.core import cli
from conntrack.core.settings import env_name

# Where cgroup v2 states the CPU quota of the process's group ("max 100000": none).
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cgroup_cpu_limit(cpu_max: str | None) -> int | None:
    """The cores a cgroup v2 cpu.max line ("QUOTA PERIOD", or "max PERIOD" for no limit)
    allows, rounded up; None for no limit or a line that is not one."""
    if not cpu_max:
        return None
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))


def cores_from(affinity: int, cpu_max: str | None) -> int:
    """The cores a process can use: those it may run on, fewer if its cgroup's quota says so
    (a container with `cpus: 2` on a 16-core host)."""
    limit = cgroup_cpu_limit(cpu_max)
    return max(1, affinity if limit is None else min(affinity, limit))


def available_cores() -> int:
    """cores_from() for this process (os.sched_getaffinity, /sys/fs/cgroup/cpu.max)."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        affinity = os.cpu_count() or 1
    try:
        cpu_max: str | None = CGROUP_CPU_MAX.read_text(encoding="ascii")
    except OSError:
        cpu_max = None
    return cores_from(affinity, cpu_max)


def resolve_workers(setting: int | None, listen: str, cores: int) -> int:
    """How many server processes `serve` runs: the api_workers setting, or one per core when it
    is unset. A Unix socket cannot be shared (SO_REUSEPORT is TCP's): one process there,
    and asking for more is a usage error."""
    if listen.startswith("unix:"):
        if setting is not None and setting > 1:
            raise cli.CommandError(
                f"{env_name('api_workers')} / --api-workers = {setting}: workers share a TCP "
                f"port, and {env_name('api_listen')} = {listen!r} is a Unix socket; use 1",
                cli.Exit.USAGE,
            )
        return 1
    return max(1, cores) if setting is None else setting
