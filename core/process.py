"""Process plumbing shared by the commands: logging, garbage-collector tuning and SIGTERM/SIGINT
handling."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import re
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final

# What aiokafka says at ERROR about every refused connection, failed fetch or lost coordinator
# while a broker is away. Whoever waits for the broker says so once, in its own words (a retry
# line, or a command's one-line error), so these go to DEBUG.
_CONNECTION_NOISE = (
    "Unable connect to",
    "Unable to update metadata",
    "Failed fetch messages",
    "Failed fetch offsets",
    "Group Coordinator Request failed",
    "FindCoordinator Request failed",
    "Heartbeat session expired",
    "Cannot send",
)


class _Quieter(logging.Filter):
    """On the handler: aiokafka's loggers are many, and a logger's filter misses its children."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.name.startswith("aiokafka")
            and isinstance(record.msg, str)
            and record.msg.startswith(_CONNECTION_NOISE)
        ):
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


# key=value, key="quoted value" or key='quoted value' (a %r of a string) in a log message.
_PAIR = re.compile(
    r"""(?<![\w.])([a-z_][a-z0-9_]*)=("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[^\s;,]+)"""
)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the message's key=value
    pairs (the project's log lines are `event=name key=value ...`) as fields of their own."""

    def __init__(self, fields: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.converter = time.gmtime
        self._fields = fields or {}

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": message,
            **self._fields,
        }
        for key, value in _PAIR.findall(message):
            if key not in out:
                out[key] = value[1:-1] if value[:1] in "\"'" and len(value) > 1 else value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str, log_format: str = "text", worker: int | None = None) -> None:
    """The one log style of every command: `time level logger: message` lines on stderr, or
    JSON lines (log_format "json"), UTC times. A worker process of `conntrack-api serve`
    (api/process/workers.py) says which one it is: `[worker N pid P]` before the message, or the
    fields worker and pid."""
    handler: logging.Handler = logging.StreamHandler()
    if log_format == "json":
        fields = None if worker is None else {"worker": worker, "pid": os.getpid()}
        handler.setFormatter(JsonFormatter(fields))
    else:
        tag = "" if worker is None else f"[worker {worker} pid {os.getpid()}] "
        formatter = logging.Formatter(f"%(asctime)s %(levelname)s %(name)s: {tag}%(message)s")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    handler.addFilter(_Quieter())
    # aiokafka logs every coordinator hiccup at WARNING while a broker starts; keep it terse.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.getLogger().level))


# The young-generation thresholds the commands choose when CONNTRACK_GC_GEN0_THRESHOLD is unset.
# Batch work: the producer's, and the least the projector and audit take
# (conntrack.core.batch.gen0_threshold grows it with their batch size).
BATCH_GEN0_THRESHOLD: Final = 50_000
PYTHON_GEN0_THRESHOLD: Final = 700  # the API: Python's own default, only the freeze added
# A gateway node holds every socket's objects for as long as the socket is open (a few hundred
# per connection), so each full collection walks all of them: 25-57 ms with 1,000 clients. At
# Python's 700 the commands in flight at each young collection were promoted, enough to set off
# a full collection every ~10 s at 1,000 Sends/s; here they are rarely still alive at one.
GATEWAY_GEN0_THRESHOLD: Final = 50_000


def tune_gc(gen0_threshold: int | None, *, default: int) -> None:
    """Set up the cyclic garbage collector for a long-running command; call once in main(),
    after the imports. gen0_threshold is the setting (None: the command's `default`); 0 leaves
    Python's defaults alone.

    Everything allocated so far (modules, generated protobuf descriptors, SQLAlchemy metadata:
    ~80k objects in the API) is moved out of the collector's sight (gc.freeze), so that an
    old-generation pass no longer walks it: one such pass paused the API for ~40 ms. Then a
    young collection runs every gen0_threshold container allocations. Batch work (a projector
    batch is tens of thousands of tuples that live until it is written) otherwise makes the
    collector traverse the same surviving objects over and over; a threshold of 50000 makes
    decode + fold markedly faster (docs/projector.md, "Batching and performance").
    The API keeps 700: a young collection of 50000 objects is a pause every Get waits for.
    Reference counting still frees everything that is not in a cycle at once; the threshold
    only delays cycles, which these commands rarely make."""
    threshold = default if gen0_threshold is None else gen0_threshold
    if threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(threshold, gen1, gen2)


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
