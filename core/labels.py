"""Who a connection is for and what it is: its principal and its labels, the one home of their
limits, their validation and their stored form.

A principal is the authenticated user or service behind a connection (a gateway takes it from
the handshake); labels are key/value pairs such as tenant, device or app version. Both come
with the connection's Connected event and are optional. The limits keep a label set small
enough to travel in every Connected and to be indexed: at most MAX_LABELS labels; a key is 1-63
characters of letters, digits and `. _ - /` starting with a letter or digit (the shape of a
Kubernetes label name, so selectors read the same); a value is at most MAX_ID_LENGTH characters
(possibly none), without control characters, without the selector's own `, ( ) = !` and without
leading or trailing spaces, so every value can be written in a selector; a principal is at most
MAX_ID_LENGTH characters and free of NUL.

A label selector (parse_selector) names connections by their labels: comma-separated
requirements that must all hold, each `key=value` or `key in (value1, value2, ...)`, as in
Kubernetes: `tenant=acme, device in (ios, android)`.

The read model stores labels as canonical JSON (keys sorted, no spaces): one text per label
set, so the fold can order two Connected events by it and the SQL merge compare it as text.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping
from typing import Final

from conntrack.core.ids import MAX_ID_LENGTH, id_problem

MAX_LABELS: Final = 16
MAX_LABEL_KEY_LENGTH: Final = 63
MAX_LABEL_VALUE_LENGTH: Final = MAX_ID_LENGTH

_KEY: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")
_BAD_VALUE: Final = re.compile(r"[\x00-\x1f\x7f,()=!]")
MAX_SELECTOR_VALUES: Final = 100
MAX_SELECTOR_LENGTH: Final = 8192

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
    if _BAD_VALUE.search(value) or value != value.strip():
        return (
            f"{name}[{key}] must not contain control characters or any of , ( ) = ! "
            "nor start or end with a space"
        )
    return None


# Label sets repeat (a few tenants, devices, versions): a pair is checked once, and a set is
# rendered once, while they stay among the recent ones. The projector decodes every Connected
# and stores its labels; without these, labels cost it a fifth of its Python time.
_RECENT = 4096


@functools.lru_cache(maxsize=_RECENT)
def _valid_pair(key: str, value: str) -> bool:
    return label_key_problem("", key) is None and label_value_problem("", key, value) is None


def labels_problem(name: str, labels: Mapping[str, str] | Iterable[tuple[str, str]]) -> str | None:
    """Why a label set is invalid (the field called `name`), or None."""
    pairs = list(labels.items() if isinstance(labels, Mapping) else labels)
    if len(pairs) > MAX_LABELS:
        return f"{name} must hold at most {MAX_LABELS} labels, got {len(pairs)}"
    seen: set[str] = set()
    for key, value in pairs:
        if not _valid_pair(key, value):
            return label_key_problem(name, key) or label_value_problem(name, key, value)
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


@functools.lru_cache(maxsize=_RECENT)
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


Selector = tuple[tuple[str, tuple[str, ...]], ...]
"""A parsed label selector: (key, allowed values) requirements, all of which must hold; sorted
by key, values sorted and distinct, one requirement per key (two for one key are merged into the
values both allow)."""

_REQUIREMENT: Final = re.compile(
    r"\s*(?P<key>[^\s=,()!]+)\s*(?:=\s*(?P<value>[^,()=!]*?)|\s+in\s*\((?P<values>[^()]*)\))\s*(?:,|$)"
)


class SelectorError(ValueError):
    """A label selector that cannot be parsed or breaks a limit; the message says where."""


def parse_selector(text: str, name: str = "label_selector") -> Selector:
    """Parse `key=value, key in (v1, v2)`; "" is the empty selector (no condition). Raises
    SelectorError naming the field `name`."""
    if len(text) > MAX_SELECTOR_LENGTH:
        raise SelectorError(f"{name} must be at most {MAX_SELECTOR_LENGTH} characters")
    if not text.strip():
        return ()
    wanted: dict[str, set[str]] = {}
    position = 0
    while position < len(text):
        match = _REQUIREMENT.match(text, position)
        if match is None or match.end() == position:
            raise SelectorError(
                f"{name} is not `key=value` or `key in (v1, v2)` at character {position + 1}: "
                f"{text[position : position + 40]!r}"
            )
        key = match["key"]
        if match["values"] is not None:
            values = {v.strip() for v in match["values"].split(",")}
            if "" in values and match["values"].strip() == "":
                raise SelectorError(f"{name}: `{key} in ()` names no value")
        else:
            values = {match["value"].strip()}
        problem = label_key_problem(name, key) or next(
            filter(None, (label_value_problem(name, key, v) for v in sorted(values))), None
        )
        if problem:
            raise SelectorError(problem)
        wanted[key] = values if key not in wanted else wanted[key] & values
        if len(wanted[key]) > MAX_SELECTOR_VALUES:
            raise SelectorError(f"{name} allows at most {MAX_SELECTOR_VALUES} values for {key!r}")
        position = match.end()
        if text[match.end() - 1 : match.end()] == "," and not text[position:].strip():
            raise SelectorError(f"{name} ends with a comma")
    if len(wanted) > MAX_LABELS:
        raise SelectorError(f"{name} may name at most {MAX_LABELS} keys, got {len(wanted)}")
    return tuple((key, tuple(sorted(values))) for key, values in sorted(wanted.items()))


def matches(selector: Selector, labels: Mapping[str, str]) -> bool:
    """Whether a connection with these labels is selected (the SQL form is the directory's)."""
    return all(labels.get(key) in values for key, values in selector)
