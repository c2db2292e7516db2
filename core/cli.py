"""What every command shares: a flag for each of its settings (beside the environment
variable), --version, exit codes, and one clear line instead of a traceback for what users
cause or meet (a bad setting, an unreachable database or broker).

Exit codes (docs: README, "Commands"):
  0   done
  1   a negative answer: not found, a divergence, a refusal the command explains
  2   usage: a bad flag or setting
  69  a dependency (the database, the Kafka broker) could not be reached
  130 interrupted (SIGINT or SIGTERM) before the work was done
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import ssl
import sys
from collections.abc import Callable, Coroutine, Iterable
from enum import IntEnum
from typing import Any, NoReturn

from aiokafka.errors import KafkaConnectionError, KafkaError
from pydantic import SecretStr, ValidationError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError

from conntrack.core.environment import unknown_variables
from conntrack.core.kafka import KafkaSetupError
from conntrack.core.process import setup_logging, tune_gc
from conntrack.core.process_metrics import package_version
from conntrack.core.retry import one_line
from conntrack.core.settings import SECTIONS, Settings, env_name


class Exit(IntEnum):
    OK = 0
    NEGATIVE = 1
    USAGE = 2
    UNAVAILABLE = 69
    INTERRUPTED = 130


class CommandError(Exception):
    """A failure the command explains in one line, with its exit code."""

    def __init__(self, message: str, code: Exit) -> None:
        super().__init__(message)
        self.code = code


_DEST = "setting__"

# Shorter flags that name the same settings (and that earlier versions offered).
ALIASES: dict[str, tuple[str, ...]] = {
    "kafka_bootstrap_servers": ("--bootstrap-servers",),
    "events_topic": ("--topic",),
    "api_listen": ("--listen",),
    "rebuild_batch_events": ("--batch-events",),
    "rebuild_max_events_per_second": ("--max-events-per-second",),
    "rebuild_max_switch_gap": ("--max-switch-gap",),
    "rebuild_lock_timeout_seconds": ("--lock-timeout",),
}


def parser(prog: str, description: str | None, sections: Iterable[str]) -> argparse.ArgumentParser:
    """A command's parser with --version and a flag for every setting of these sections."""
    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    add_settings(p, sections)
    return p


def flag(setting: str) -> str:
    """A setting's command-line flag: --name-with-dashes."""
    return "--" + setting.replace("_", "-")


def add_settings(p: argparse.ArgumentParser, sections: Iterable[str]) -> None:
    """One flag per setting, --name-with-dashes; its help names the environment variable and
    the default. Usable on a subcommand's parser too, so flags work after the subcommand."""
    wanted = set(sections)
    unknown = wanted - set(SECTIONS)
    assert not unknown, f"no such settings sections: {unknown}"
    for section in SECTIONS:
        if section not in wanted:
            continue
        group = p.add_argument_group(f"{section} settings")
        for name in SECTIONS[section]:
            field = Settings.model_fields[name]
            default = field.default
            shown = "unset" if default is None else default
            text = (field.description or "").rstrip(".")
            group.add_argument(
                flag(name),
                *ALIASES.get(name, ()),
                dest=_DEST + name,
                metavar=name.rsplit("_", 1)[-1].upper(),
                default=argparse.SUPPRESS,
                # argparse expands %-formats in help texts: a literal % is written %%.
                help=f"{text}{'; ' if text else ''}env {env_name(name)} (default: {shown})".replace(
                    "%", "%%"
                ),
            )


def settings_from_args(ns: argparse.Namespace, **overrides: Any) -> Settings:
    """The settings from the environment with the flags that were given on top. A bad value is
    a CommandError naming the variable and the flag."""
    given = {k.removeprefix(_DEST): v for k, v in vars(ns).items() if k.startswith(_DEST)}
    given |= {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            name = str(error["loc"][0]) if error["loc"] else "settings"
            value = _without_secrets(name, error.get("input"))
            why = str(error["msg"]).removeprefix("Value error, ")
            lines.append(
                f"{env_name(name)} / {flag(name)} = {value}: {why}"
                if name in Settings.model_fields
                else why
            )
        raise CommandError("; ".join(lines), Exit.USAGE) from None


# user:password@ in a URL (database URLs, lists of them): the password is replaced, the rest
# stays, so the line still says which value was refused.
_URL_PASSWORD = re.compile(r"(://[^/:@\s,]*:)[^@\s,]*@")


def _without_secrets(name: str, value: Any) -> str:
    """A refused value as an error line may show it: never a password, whether the setting is
    a secret or a URL that carries one."""
    if "password" in name or isinstance(value, SecretStr):
        return "'***'"
    if isinstance(value, str):
        return repr(_URL_PASSWORD.sub(r"\1***@", value))
    return repr(value)


def run(
    prog: str,
    body: Callable[[], int | Coroutine[Any, Any, int]],
    settings: Settings | None = None,
    interrupted: str = "interrupted",
) -> NoReturn:
    """Run a command's body (in an event loop if it is a coroutine) and exit with its code.
    SIGTERM is treated like SIGINT. Errors users meet become one line on stderr: a bad setting
    (2; also a broker refusing the credentials or certificate), an unreachable database or
    broker (69); anything else is a bug and keeps its traceback. `interrupted` is what to tell
    the operator on SIGINT or SIGTERM."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        result = body()
        code = _run_until_signal(result) if asyncio.iscoroutine(result) else result
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        code = Exit.INTERRUPTED
    except CommandError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        code = exc.code
    except KafkaSetupError as exc:  # a credential, the CA, the protocol: not worth a retry
        print(f"{prog}: {exc}", file=sys.stderr)
        code = Exit.USAGE
    except ssl.SSLCertVerificationError as exc:  # the database's certificate: not worth a retry
        print(
            f"{prog}: the database's certificate does not verify ({exc.verify_message}); check "
            f"sslmode and sslrootcert in {env_name('database_url')}",
            file=sys.stderr,
        )
        code = Exit.USAGE
    except Exception as exc:  # mapped to one line, or re-raised
        message = dependency_error(exc, settings)
        if message is None:
            raise
        print(f"{prog}: {message}", file=sys.stderr)
        code = Exit.UNAVAILABLE
    sys.exit(int(code))


def _run_until_signal(body: Coroutine[Any, Any, int]) -> int:
    """Run a command's coroutine; SIGTERM cancels it, as asyncio does for SIGINT, and is then
    reported as KeyboardInterrupt. (A KeyboardInterrupt raised by the signal handler itself can
    land inside any task and leave a "Task exception was never retrieved" traceback behind.)
    A command that installs its own SIGTERM handler replaces this one."""
    terminated = False

    async def main() -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def on_sigterm() -> None:
            nonlocal terminated
            terminated = True
            task.cancel()

        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        return await body

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        if terminated:
            raise KeyboardInterrupt from None
        raise


def start(
    prog: str,
    ns: argparse.Namespace,
    *,
    gen0_threshold: int | Callable[[Settings], int] | None,
    log_level: str | None = None,
) -> Settings:
    """What every command does once its flags are parsed: the settings (a bad one is one line
    and exit 2), logging (at the settings' level, or `log_level` for commands whose output is
    their result), and the garbage collector of a long-running command (`gen0_threshold`: its
    default threshold, or a function of the settings giving it; None leaves the collector
    alone)."""
    try:
        settings = settings_from_args(ns)
    except CommandError as exc:
        fail(prog, exc)
    setup_logging(log_level or settings.log_level, settings.log_format)
    for name, close in unknown_variables(os.environ):
        hint = f" (did you mean {close}?)" if close else ""
        logging.getLogger(prog).warning("%s is not a setting%s; it is ignored", name, hint)
    if callable(gen0_threshold):
        gen0_threshold = gen0_threshold(settings)
    if gen0_threshold is not None:
        tune_gc(settings.gc_gen0_threshold, default=gen0_threshold)
    return settings


def fail(prog: str, exc: CommandError) -> NoReturn:
    """Report a CommandError raised outside run() (while reading the settings) and exit."""
    print(f"{prog}: {exc}", file=sys.stderr)
    sys.exit(int(exc.code))


def dependency_error(exc: BaseException, settings: Settings | None) -> str | None:
    """One line for an unreachable database or broker, or None if exc is neither."""
    if isinstance(exc, KafkaConnectionError) or (
        isinstance(exc, KafkaError) and "connect" in str(exc).lower()
    ):
        where = settings.kafka_bootstrap_servers if settings else "the configured servers"
        # A listener of another protocol (TLS, SASL) just drops the connection: name it too.
        protocol = f" (now {settings.kafka_security_protocol})" if settings else ""
        return (
            f"cannot reach the Kafka broker at {where} ({one_line(exc)}); check "
            f"{env_name('kafka_bootstrap_servers')}, {env_name('kafka_security_protocol')}"
            f"{protocol} and that the broker is up"
        )
    if isinstance(exc, ArgumentError):
        return None
    if isinstance(exc, (OperationalError, DBAPIError, ConnectionError, TimeoutError)):
        where = (
            make_url(settings.database_url).render_as_string(hide_password=True)
            if settings
            else "the configured database"
        )
        return (
            f"cannot reach the database {where} ({one_line(exc)}); check "
            f"{env_name('database_url')} and that the server is up"
        )
    return None
