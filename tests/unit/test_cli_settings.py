"""A refused setting is named in one line that never shows a password."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from pydantic import SecretStr

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


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("database_url", "postgresql+asyncpg://bob:s3cret@db:5432/conntrack"),
        ("api_read_database_urls", "postgresql+asyncpg://r:pw@replica/conntrack"),
        ("kafka_ssl_key_password", "key-pass"),
        ("api_client_token", "token-1"),
    ],
)
def test_a_secret_may_be_given_as_a_file(name: str, value: str, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(value + "\n")  # as `echo` writes it
    settings = settings_from_args(argparse.Namespace(), **{f"{name}_file": str(secret)})
    got = getattr(settings, name)
    assert (got.get_secret_value() if isinstance(got, SecretStr) else got) == value
    refused = {
        "not both": {name: value, f"{name}_file": str(secret)},
        "cannot read": {f"{name}_file": str(tmp_path / "absent")},
        "is empty": {f"{name}_file": str(tmp_path / "empty")},
    }
    (tmp_path / "empty").write_text("\n")
    for why, given in refused.items():
        with pytest.raises(CommandError) as error:
            settings_from_args(argparse.Namespace(), **given)
        line = str(error.value)
        assert why in line
        assert f"CONNTRACK_{name.upper()}_FILE" in line
        assert value not in line
