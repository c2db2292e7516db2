"""Process plumbing shared by the commands: logging and SIGTERM/SIGINT handling."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # aiokafka logs every coordinator hiccup at ERROR/WARNING while a broker starts; keep it terse.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.getLogger().level))


def on_shutdown_signal(callback: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run callback once on the first SIGTERM or SIGINT; a second signal kills as usual."""
    loop = asyncio.get_running_loop()
    fired = False
    tasks: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks

    def handler(sig: signal.Signals) -> None:
        nonlocal fired
        logging.getLogger(__name__).info("received %s, shutting down", sig.name)
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(s)
        if not fired:
            fired = True
            task = loop.create_task(callback())
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handler, sig)
