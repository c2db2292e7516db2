"""The reference gateway with one rule of the node role broken on purpose, to show that the
conformance kit catches each: `python -m tests.support.faulty_gateway FAULT`, then the gateway's
settings from the environment as for `conntrack-gateway`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from conntrack.core.commands import Command, DataType
from conntrack.gateway import server
from conntrack.gateway.__main__ import main
from conntrack.producer import command_execution, commands


def text_as_binary() -> None:
    send = server.Gateway.send

    async def as_binary(self: Any, connection_id: str, data: bytes, _: DataType, /) -> bool:
        return await send(self, connection_id, data, DataType.BINARY)

    server.Gateway.send = as_binary  # type: ignore[method-assign]


def close_code_ignored() -> None:
    disconnect = server.Gateway.disconnect

    async def normal_closure(self: Any, connection_id: str, _: int, __: str, /) -> bool:
        return await disconnect(self, connection_id, 1000, "")

    server.Gateway.disconnect = normal_closure  # type: ignore[method-assign]


def unknown_as_done() -> None:
    send = server.Gateway.send

    async def always_held(self: Any, connection_id: str, data: bytes, kind: DataType, /) -> bool:
        await send(self, connection_id, data, kind)
        return True

    server.Gateway.send = always_held  # type: ignore[method-assign]


def expired_executed() -> None:
    execute = command_execution.CommandExecutor.execute

    async def without_deadline(self: Any, command: Command, incarnation: int) -> Any:
        return await execute(self, replace(command, expires_at_ns=0), incarnation)

    command_execution.CommandExecutor.execute = without_deadline  # type: ignore[method-assign]


def duplicates_executed() -> None:
    def forget(self: Any, command_id: str, outcome: bytes) -> None:
        pass

    commands.NodeCommands._remember_outcome = forget  # type: ignore[method-assign]


def fence_ignored() -> None:
    async def ignore(self: Any, incarnation: int, /) -> None:
        pass

    server.Gateway.fenced = ignore  # type: ignore[method-assign]


FAULTS: dict[str, Callable[[], None]] = {
    f.__name__.replace("_", "-"): f
    for f in (
        text_as_binary,
        close_code_ignored,
        unknown_as_done,
        expired_executed,
        duplicates_executed,
        fence_ignored,
    )
}

if __name__ == "__main__":
    FAULTS[sys.argv.pop(1)]()
    main()
