"""bench/procstat.py: CPU windows count the time of processes that exit inside the window."""

from __future__ import annotations

import os
import subprocess
import sys

from bench.procstat import CpuWindow

BURN = "import time\nwhile time.process_time() < 0.3:\n    pass\n"


def test_a_child_that_exits_inside_the_window_still_counts_for_its_parent() -> None:
    """As a PostgreSQL backend that closes inside the window counts for the postmaster."""
    window = CpuWindow({"parent": os.getpid()})
    subprocess.run([sys.executable, "-c", BURN], check=True)  # waited for: reaped
    use = window.finish()
    assert use.cores["parent"] * use.seconds >= 0.25


def test_live_children_count_for_their_parent() -> None:
    """As the workers of `conntrack-api serve` count for their supervisor."""
    window = CpuWindow({"parent": os.getpid()})
    child = subprocess.Popen(
        [sys.executable, "-c", BURN + "print('burnt', flush=True)\ninput()\n"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None
    assert child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "burnt"
        use = window.finish()  # the child is alive: not yet in the parent's reaped figure
        assert use.cores["parent"] * use.seconds >= 0.25
    finally:
        child.stdin.close()
        child.wait()
        child.stdout.close()
