"""conntrack-migrate: bring the read-model database to the newest schema (or another revision)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config

from connection_tracker.settings import settings_from

SCRIPT_LOCATION = Path(__file__).resolve().parent


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    # ConfigParser interpolation would choke on '%' in a URL-encoded password.
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="conntrack-migrate", description=__doc__)
    parser.add_argument("--database-url", help="overrides CONNTRACK_DATABASE_URL")
    sub = parser.add_subparsers(dest="action")
    up = sub.add_parser("upgrade", help="upgrade to a revision (default: head)")
    up.add_argument("revision", nargs="?", default="head")
    down = sub.add_parser("downgrade", help="downgrade to a revision")
    down.add_argument("revision")
    sub.add_parser("current", help="show the current revision")
    ns = parser.parse_args(argv)
    settings = settings_from(database_url=ns.database_url)
    logging.basicConfig(level=settings.log_level, format="%(levelname)s %(name)s: %(message)s")
    cfg = alembic_config(settings.database_url)
    if ns.action == "downgrade":
        command.downgrade(cfg, ns.revision)
    elif ns.action == "current":
        command.current(cfg, verbose=True)
    else:
        command.upgrade(cfg, getattr(ns, "revision", "head"))


if __name__ == "__main__":
    main()
