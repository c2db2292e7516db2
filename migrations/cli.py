"""conntrack-migrate: bring the read-model database to the newest schema (or another revision)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.util import CommandError as AlembicCommandError

from conntrack.core import cli

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
    parser = cli.parser("conntrack-migrate", __doc__, ("database", "logging"))
    sub = parser.add_subparsers(dest="action")
    up = sub.add_parser("upgrade", help="upgrade to a revision (default: head)")
    up.add_argument("revision", nargs="?", default="head")
    down = sub.add_parser("downgrade", help="downgrade to a revision")
    down.add_argument("revision")
    current = sub.add_parser("current", help="show the current revision")
    for p in (up, down, current):
        cli.add_settings(p, ("database", "logging"))
    ns = parser.parse_args(argv)
    settings = cli.start("conntrack-migrate", ns, gen0_threshold=None)
    cfg = alembic_config(settings.database_url)

    def migrate() -> int:
        try:
            if ns.action == "downgrade":
                command.downgrade(cfg, ns.revision)
            elif ns.action == "current":
                command.current(cfg, verbose=True)
            else:
                command.upgrade(cfg, getattr(ns, "revision", "head"))
        except AlembicCommandError as exc:  # a revision that does not exist, and the like
            raise cli.CommandError(
                f"{exc} (`conntrack-migrate current` shows where it is)", cli.Exit.USAGE
            ) from None
        return cli.Exit.OK

    cli.run("conntrack-migrate", migrate, settings)


if __name__ == "__main__":
    main()
