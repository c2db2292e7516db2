"""Who a connection is for and what it is: its principal and its labels, the one home of their
limits, their validation and their stored form.

A principal is the authenticated user or service behind a connection (a gateway takes it from
the handshake); labels are key/value pairs such as tenant, device or app version. Both come
with the connection's Connected event and are optional. The limits keep a label set small
enough to travel in every Connected and to be indexed: at most MAX_LABELS labels; a key is 1-63
characters of letters, digits and `. _ - /` starting with a letter or digit (the shape of a
Kubernetes label name, so selectors read the same); a value and a principal are at most
MAX_ID_LENGTH characters and free of NUL.

The read model stores labels as canonical JSON (keys sorted, no spaces): one text per label
set, so the fold can order two Connected events by it and the SQL merge compare it as text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Final

from conntrack.core.ids import MAX_ID_LENGTH, id_problem

MAX_LABELS: Final = 16
MAX_LABEL_KEY_LENGTH: Final = 63
MAX_LABEL_VALUE_LENGTH: Final = MAX_ID_LENGTH

_KEY: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")

Labels = tuple[tuple[str, str], ...]
"""A label set as the events carry it: (key, value) pairs sorted by key, each key once."""


def principal_problem(name: str, principal: str) -> str | None:
    """Why `principal` is not a valid principal (the field called `name`), or None; "" is
    valid (no principal)."""
    return id_problem(name, principal, required=False)


def label_key_problem(name: str, key: str) -> str | None:
    if not key:
        return f"{name} has an empty key"
    if len(key) > MAX_LABEL_KEY_LENGTH:
        return f"{name} key must be at most {MAX_LABEL_KEY_LENGTH} characters, got {len(key)}"
    if not _KEY.fullmatch(key):
        return (
            f"{name} key {key[:MAX_LABEL_KEY_LENGTH]!r} must be letters, digits and . _ - / "
            "starting with a letter or digit"
        )
    return None


def label_value_problem(name: str, key: str, value: str) -> str | None:
    if len(value) > MAX_LABEL_VALUE_LENGTH:
        return (
            f"{name}[{key}] must be at most {MAX_LABEL_VALUE_LENGTH} characters, got {len(value)}"
        )
    if "\x00" in value:
        return f"{name}[{key}] must not contain NUL"
    return None


def labels_problem(name: str, labels: Mapping[str, str] | Iterable[tuple[str, str]]) -> str | None:
    """Why a label set is invalid (the field called `name`), or None."""
    pairs = list(labels.items() if isinstance(labels, Mapping) else labels)
    if len(pairs) > MAX_LABELS:
        return f"{name} must hold at most {MAX_LABELS} labels, got {len(pairs)}"
    seen: set[str] = set()
    for key, value in pairs:
        problem = label_key_problem(name, key) or label_value_problem(name, key, value)
        if problem:
            return problem
        if key in seen:
            return f"{name} has the key {key!r} twice"
        seen.add(key)
    return None


def normalized(labels: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> Labels:
    """The label set as the events carry it (sorted by key); not validated."""
    if not labels:
        return ()
    pairs = labels.items() if isinstance(labels, Mapping) else labels
    return tuple(sorted(pairs))


def to_json(labels: Labels) -> str | None:
    """The stored form of a label set: canonical JSON, None for no labels."""
    if not labels:
        return None
    return json.dumps(dict(labels), separators=(",", ":"), ensure_ascii=False, sort_keys=True)


def from_json(stored: str | None) -> dict[str, str]:
    """A stored label set back as a dict ({} for None)."""
    if not stored:
        return {}
    value = json.loads(stored)
    assert isinstance(value, dict)
    return {str(k): str(v) for k, v in value.items()}
