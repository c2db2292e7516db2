"""Database URLs as managed PostgreSQL hands them out, against a real server that takes TLS (a
private one, started by infra/postgres.sh with CONNTRACK_PG_TLS_DIR): `sslmode` and the
certificate parameters mean what they mean to libpq, through the engine every command uses; a
certificate that does not verify, a server without TLS when TLS is required, a revision that does
not exist and a misspelt variable are each one line from `conntrack-migrate`, with its exit
code."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from conntrack.core.database import create_engine
from tests.conftest import POSTGRES_URL
from tests.support.ports import free_port
from tests.support.tls import make_ca, make_leaf

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
POSTGRES_SH = REPO / "infra" / "postgres.sh"
MIGRATE = Path(sys.executable).parent / "conntrack-migrate"


@pytest.fixture(scope="module")
def tls_server() -> Iterator[tuple[str, Path, Path]]:
    """A private PostgreSQL server taking TLS with a certificate for 127.0.0.1 signed by a
    throwaway CA; yields its URL, that CA's certificate and another CA's."""
    # The data directory must be reachable by the postgres OS user: not under pytest's tmp_path.
    base = Path(tempfile.mkdtemp(prefix="conntrack-pg-tls-"))
    base.chmod(0o755)
    certs = base / "certs"
    certs.mkdir()
    ca = make_ca(certs, "ca")
    other_ca = make_ca(certs, "other-ca")
    cert, key = make_leaf(
        certs, "server", ca, "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"
    )
    (certs / "server.crt").write_bytes(cert.read_bytes())
    (certs / "server.key").write_bytes(key.read_bytes())
    port = free_port()
    env = {
        **os.environ,
        "CONNTRACK_PG_PORT": str(port),
        "CONNTRACK_PG_DIR": str(base / "pg"),
        "CONNTRACK_PG_TLS_DIR": str(certs),
    }

    def script(*args: str) -> None:
        done = subprocess.run(
            ["bash", str(POSTGRES_SH), *args], env=env, capture_output=True, text=True, timeout=180
        )
        assert done.returncode == 0, done.stdout + done.stderr

    script("up")
    try:
        yield f"postgresql+asyncpg://conntrack@127.0.0.1:{port}/conntrack", ca[0], other_ca[0]
    finally:
        script("down")


async def encrypted(url: str) -> bool:
    """Whether the engine's session with this URL runs over TLS, as the server sees it."""
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            found = await conn.execute(
                text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            )
            return bool(found.scalar_one())
    finally:
        await engine.dispose()


async def test_sslmode_and_certificates_mean_what_they_mean_to_libpq(
    tls_server: tuple[str, Path, Path],
) -> None:
    url, ca, _ = tls_server
    assert await encrypted(f"{url}?sslmode=require")
    assert await encrypted(f"{url}?sslmode=verify-full&sslrootcert={ca}")
    assert await encrypted(f"{url}?sslmode=verify-ca&sslrootcert={ca}")
    assert not await encrypted(f"{url}?sslmode=disable")
    assert await encrypted(f"{url}?sslmode=prefer&application_name=ops")


def migrate(url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MIGRATE), *args],
        env={**os.environ, "CONNTRACK_DATABASE_URL": url, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def problem_lines(done: subprocess.CompletedProcess[str]) -> list[str]:
    """stderr without Alembic's INFO lines."""
    return [line for line in done.stderr.splitlines() if " INFO " not in line]


async def test_what_fails_is_one_line_with_its_exit_code(
    tls_server: tuple[str, Path, Path],
) -> None:
    url, ca, other_ca = tls_server
    # A certificate signed by a CA the client does not trust.
    done = await asyncio.to_thread(
        migrate, f"{url}?sslmode=verify-full&sslrootcert={other_ca}", "current"
    )
    (line,) = problem_lines(done)
    assert done.returncode == 2, done.stderr
    assert line == (
        "conntrack-migrate: the database's certificate does not verify (unable to get local "
        "issuer certificate); check sslmode and sslrootcert in CONNTRACK_DATABASE_URL"
    )
    # TLS required of a server that has none (the shared test server).
    done = await asyncio.to_thread(migrate, f"{POSTGRES_URL}?sslmode=require", "current")
    (line,) = problem_lines(done)
    assert done.returncode == 69, done.stderr
    assert "rejected SSL upgrade" in line, line
    # A revision that does not exist.
    done = await asyncio.to_thread(
        migrate, f"{url}?sslmode=verify-full&sslrootcert={ca}", "downgrade", "nope"
    )
    (line,) = problem_lines(done)
    assert done.returncode == 2, done.stderr
    assert line == (
        "conntrack-migrate: Can't locate revision identified by 'nope' "
        "(`conntrack-migrate current` shows where it is)"
    )
    # A misspelt variable is named, with the setting it is closest to; the command goes on.
    done = await asyncio.to_thread(
        migrate,
        f"{url}?sslmode=require",
        "upgrade",
        CONNTRACK_DATABSE_URL="sqlite+aiosqlite:///x.db",
    )
    assert done.returncode == 0, done.stderr
    (line,) = problem_lines(done)
    assert line.endswith(
        "WARNING conntrack-migrate: CONNTRACK_DATABSE_URL is not a setting "
        "(did you mean CONNTRACK_DATABASE_URL?); it is ignored"
    ), line
