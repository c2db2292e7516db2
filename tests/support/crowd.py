"""A crowd: thousands of real WebSocket clients of one gateway node, held by a process of their
own (one test process cannot hold and read 10,000 sockets and still drive the API in time).
Each client connects with its own handshake headers (a principal and labels for the gateway's
trusted-header identity) and counts every frame it receives; the test asks the crowd to connect
more, to close some, and what each connection received."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
from collections import defaultdict
from typing import Any

Headers = dict[str, str]
_SLICE = 50  # connections opened at once, so the gateway's accept queue is not flooded
_REPLY_S = 300.0


async def _serve(url: str, commands: Any, replies: Any) -> None:
    from websockets.asyncio.client import ClientConnection, connect

    clients: dict[str, ClientConnection] = {}
    received: dict[str, list[str | bytes]] = defaultdict(list)
    # The close code each connection the server closed got (those the crowd closed are absent).
    closed_by_server: dict[str, int | None] = {}
    readers: list[asyncio.Task[None]] = []

    async def read(cid: str, ws: ClientConnection) -> None:
        with contextlib.suppress(Exception):
            async for message in ws:
                received[cid].append(message)
        if cid in clients:
            closed_by_server[cid] = ws.close_code

    async def open_all(headers: list[Headers]) -> list[str]:
        opened: list[str] = []
        for start in range(0, len(headers), _SLICE):
            batch = await asyncio.gather(
                *(connect(url, additional_headers=h) for h in headers[start : start + _SLICE])
            )
            for ws in batch:
                assert ws.response is not None
                cid = ws.response.headers["X-Connection-Id"]
                clients[cid] = ws
                readers.append(asyncio.create_task(read(cid, ws)))
                opened.append(cid)
        return opened

    while True:
        command, argument = await asyncio.to_thread(commands.get)
        if command == "open":
            replies.put(await open_all(argument))
        elif command == "close":
            await asyncio.gather(*(clients.pop(cid).close() for cid in argument))
            replies.put(None)
        elif command == "received":
            replies.put({cid: list(frames) for cid, frames in received.items()})
        elif command == "closed_by_server":
            replies.put(dict(closed_by_server))
        else:  # stop
            await asyncio.gather(*(ws.close() for ws in clients.values()))
            for task in readers:
                task.cancel()
            replies.put(None)
            return


def _main(url: str, commands: Any, replies: Any) -> None:
    asyncio.run(_serve(url, commands, replies))


class Crowd:
    """Clients of the gateway node at `url`, in a process of their own. Async context manager;
    every method waits for the crowd's answer."""

    def __init__(self, url: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._commands = context.Queue()
        self._replies = context.Queue()
        self._process = context.Process(
            target=_main, args=(url, self._commands, self._replies), daemon=True
        )

    async def _ask(self, command: str, argument: object = None) -> Any:
        self._commands.put((command, argument))
        return await asyncio.to_thread(self._replies.get, True, _REPLY_S)

    async def open(self, headers: list[Headers]) -> list[str]:
        """Connect one client per entry (its handshake headers); their connection ids."""
        ids: list[str] = await self._ask("open", headers)
        return ids

    async def close(self, connection_ids: list[str]) -> None:
        """Close these clients' connections (a normal closure, each waited for)."""
        await self._ask("close", connection_ids)

    async def received(self) -> dict[str, list[str | bytes]]:
        """Every frame each connection has received so far, in order."""
        frames: dict[str, list[str | bytes]] = await self._ask("received")
        return frames

    async def closed_by_server(self) -> dict[str, int | None]:
        """The close code of each connection the server closed (or None: it dropped)."""
        codes: dict[str, int | None] = await self._ask("closed_by_server")
        return codes

    async def __aenter__(self) -> Crowd:
        self._process.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self._ask("stop")
        finally:
            await asyncio.to_thread(self._process.join, 30)
            if self._process.is_alive():
                self._process.kill()
