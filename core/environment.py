"""The process environment's CONNTRACK_* variables beside the settings: those that are not one
(a misspelt name is otherwise ignored without a word), for every command to warn about at start
(core/cli.py)."""

from __future__ import annotations

import difflib
from collections.abc import Mapping

from conntrack.core.settings import ENV_PREFIX, Settings, env_name

# CONNTRACK_* variables that are not settings: the infra scripts', the tests' and the
# benchmark's, and the image's healthcheck's.
NOT_SETTINGS_PREFIXES = (
    "CONNTRACK_TEST_",
    "CONNTRACK_BENCH_",
    "CONNTRACK_PG_",
    "CONNTRACK_CLUSTER_",
)
NOT_SETTINGS = frozenset(
    {
        "CONNTRACK_KAFKA_PORT",
        "CONNTRACK_KAFKA_CTRL_PORT",
        "CONNTRACK_KAFKA_HEAP",
        "CONNTRACK_KAFKA_SECURITY",
        "CONNTRACK_STATE_DIR",
        "CONNTRACK_HEALTHCHECK_STATE",
    }
)


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """CONNTRACK_* variables in `environ` that are not settings (a misspelt one is otherwise
    ignored without a word), each with the closest setting's name, if one is close."""
    known = [env_name(name) for name in Settings.model_fields]
    out = []
    for name in sorted(environ):
        upper = name.upper()
        if (
            not upper.startswith(ENV_PREFIX)
            or upper in known
            or upper in NOT_SETTINGS
            or upper.startswith(NOT_SETTINGS_PREFIXES)
        ):
            continue
        close = difflib.get_close_matches(upper, known, n=1, cutoff=0.75)
        out.append((name, close[0] if close else None))
    return out
