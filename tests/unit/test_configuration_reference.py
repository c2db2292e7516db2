"""docs/configuration.md is the rendering of the settings: a setting added, renamed, given a new
default or description without `make docs` fails here."""

from __future__ import annotations

from pathlib import Path

from conntrack.core.configuration import reference
from conntrack.core.settings import SECTIONS, Settings, env_name

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_the_committed_reference_is_current() -> None:
    assert DOC.read_text() == reference(), "docs/configuration.md is stale: run `make docs`"


def test_every_setting_is_in_the_reference_once() -> None:
    text = reference()
    for name in Settings.model_fields:
        assert text.count(f"| `{env_name(name)}` |") == 1, name
    for section in SECTIONS:
        assert f"\n## {section}\n" in text
