"""An HTTP client of the REST mapping, and how its error answers are judged (grpc-gateway's
status JSON)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
from yarl import URL

from conntrack.api.transport.server import ApiServer


@contextlib.asynccontextmanager
async def http(server: ApiServer, scheme: str = "http") -> AsyncIterator[Client]:
    async with aiohttp.ClientSession() as session:
        yield Client(session, f"{scheme}://127.0.0.1:{server.rest_port}")


class Client:
    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session, self.base = session, base

    async def call(
        self, method: str, path: str, body: Any = None, **kwargs: Any
    ) -> tuple[int, Any, dict[str, str]]:
        """(HTTP status, the JSON answer, the headers); path is sent as written (encoded)."""
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        async with self.session.request(
            method, URL(self.base + path, encoded=True), data=body, **kwargs
        ) as response:
            assert response.content_type == "application/json", await response.text()
            return response.status, await response.json(), dict(response.headers)


def status(code: grpc.StatusCode) -> int:
    return int(code.value[0])


def is_error(answer: Any, code: grpc.StatusCode, *, containing: str = "") -> bool:
    return (
        set(answer) == {"code", "message", "details"}
        and answer["code"] == status(code)
        and answer["details"] == []
        and containing in answer["message"]
    )
