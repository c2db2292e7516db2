"""Database URLs as people paste them: libpq's parameters (`?sslmode=require` from a managed
PostgreSQL console) become the asyncpg arguments that say the same, and anything else is refused
in one line naming it, before any connection is tried; misspelt CONNTRACK_* variables are named
with the setting they are closest to."""

from __future__ import annotations

import argparse
import ssl
from pathlib import Path

import pytest

from conntrack.core.cli import CommandError, settings_from_args
from conntrack.core.database import DatabaseUrlError, postgres_connect_arguments
from conntrack.core.environment import unknown_variables
from tests.support.tls import make_ca, make_leaf

BASE = "postgresql+asyncpg://u:pw@db.example:5432/conntrack"


@pytest.mark.parametrize(
    ("query", "arguments"),
    [
        ("", {}),
        ("?sslmode=require", {"ssl": "require"}),
        ("?sslmode=disable", {"ssl": "disable"}),
        ("?sslmode=verify-full", {"ssl": "verify-full"}),
        ("?application_name=ops", {"server_settings": {"application_name": "ops"}}),
        ("?connect_timeout=7", {"timeout": 7.0}),
    ],
)
def test_libpq_parameters_become_asyncpg_arguments(
    query: str, arguments: dict[str, object]
) -> None:
    url, args = postgres_connect_arguments(BASE + query)
    assert args == arguments
    assert url.query == {}
    assert url.render_as_string(hide_password=False) == BASE


def test_asyncpg_parameters_are_passed_on() -> None:
    url, args = postgres_connect_arguments(BASE + "?ssl=require&prepared_statement_cache_size=0")
    assert args == {}
    assert dict(url.query) == {"ssl": "require", "prepared_statement_cache_size": "0"}


@pytest.mark.parametrize(
    ("query", "why"),
    [
        ("?sslmode=requir", "sslmode must be one of disable, allow, prefer"),
        ("?channel_binding=require", "parameter 'channel_binding' is not one"),
        ("?sslmode=require&sslmode=disable", "gives 'sslmode' more than once"),
        ("?connect_timeout=soon", "connect_timeout must be a number of seconds"),
        ("?sslmode=prefer&sslrootcert=/ca.crt", "use require, verify-ca or verify-full"),
        ("?sslmode=verify-ca&sslrootcert=/no/such/ca.crt", "cannot use the certificate files"),
    ],
)
def test_what_the_driver_cannot_take_is_refused_naming_it(query: str, why: str) -> None:
    with pytest.raises(DatabaseUrlError, match=why):
        postgres_connect_arguments(BASE + query)
    # At the settings, as one line naming the variable, the password hidden.
    with pytest.raises(CommandError) as refused:
        settings_from_args(argparse.Namespace(), database_url=BASE + query)
    line = str(refused.value)
    assert line.startswith("CONNTRACK_DATABASE_URL / --database-url = ")
    assert why.split("'")[0] in line
    assert "pw@" not in line
    assert "\n" not in line
    with pytest.raises(CommandError):
        settings_from_args(argparse.Namespace(), api_read_database_urls=BASE + query)


def test_certificate_files_make_the_context_libpq_would(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "ca")
    client = make_leaf(tmp_path, "client", ca, "extendedKeyUsage=clientAuth")
    files = f"sslrootcert={ca[0]}&sslcert={client[0]}&sslkey={client[1]}"
    _, full = postgres_connect_arguments(f"{BASE}?sslmode=verify-full&{files}")
    context = full["ssl"]
    assert isinstance(context, ssl.SSLContext)
    assert context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED
    _, by_ca = postgres_connect_arguments(f"{BASE}?sslmode=verify-ca&sslrootcert={ca[0]}")
    assert not by_ca["ssl"].check_hostname
    assert by_ca["ssl"].verify_mode == ssl.CERT_REQUIRED
    # require with a root certificate verifies it, as libpq does; without one it does not.
    _, required = postgres_connect_arguments(f"{BASE}?sslmode=require&sslrootcert={ca[0]}")
    assert required["ssl"].verify_mode == ssl.CERT_REQUIRED
    _, bare = postgres_connect_arguments(
        f"{BASE}?sslmode=require&sslcert={client[0]}&sslkey={client[1]}"
    )
    assert bare["ssl"].verify_mode == ssl.CERT_NONE
    # No sslmode but files: verify-full, libpq's strictest reading of them.
    _, implied = postgres_connect_arguments(f"{BASE}?sslrootcert={ca[0]}")
    assert implied["ssl"].check_hostname


def test_misspelt_variables_are_named_with_the_closest_setting() -> None:
    environ = {
        "CONNTRACK_DATABSE_URL": "x",
        "conntrack_log_levl": "DEBUG",
        "CONNTRACK_WHATEVER": "1",
        "CONNTRACK_DATABASE_URL": "sqlite+aiosqlite:///x.db",  # a setting
        "CONNTRACK_TEST_KAFKA": "127.0.0.1:19092",  # the tests'
        "CONNTRACK_PG_DURABLE": "1",  # infra/postgres.sh's
        "PATH": "/bin",
    }
    assert unknown_variables(environ) == [
        ("CONNTRACK_DATABSE_URL", "CONNTRACK_DATABASE_URL"),
        ("CONNTRACK_WHATEVER", None),
        ("conntrack_log_levl", "CONNTRACK_LOG_LEVEL"),
    ]
