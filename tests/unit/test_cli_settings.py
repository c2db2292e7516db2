"""A refused setting is named in one line that never shows a password."""

from __future__ import annotations

import argparse

import pytest

from conntrack.core.cli import CommandError, settings_from_args


@pytest.mark.parametrize(
    ("overrides", "secret", "shown"),
    [
        (
            {"database_url": "postgresql://bob:s3cret@db:5432/x"},
            "s3cret",
            "postgresql://bob:***@db:5432/x",
        ),
        (
            {"api_read_database_urls": "postgresql+asyncpg://a:pw1@h/d,mysql://b:pw2@h/d"},
            "pw",
            "mysql://b:***@h/d",
        ),
    ],
)
def test_a_refused_url_is_shown_without_its_password(
    overrides: dict[str, str], secret: str, shown: str
) -> None:
    with pytest.raises(CommandError) as refused:
        settings_from_args(argparse.Namespace(), **overrides)
    line = str(refused.value)
    assert shown in line
    assert secret not in line
    assert "\n" not in line
