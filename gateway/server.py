"""The reference gateway's sockets: each accepted WebSocket gets a connection id (the
connection's uuid4, hex), its Connected, Activity (coalesced by the Publisher) and Disconnected
events go out through a Publisher with the node role, and the node's commands (producer/commands.py)
write frames to it and close it. The connection id is also returned to the client in the
handshake's `X-Connection-Id` response header, so a client (or a demo) can name itself to the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from http import HTTPStatus
from typing import Final

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from conntrack.core import tracing
from conntrack.core.commands import FENCED_CLOSE_CODE, DataType
from conntrack.core.events import Cause, Connected
from conntrack.gateway.handshake import NOBODY, HandshakeRefused, Handshakes, Identity
from conntrack.producer.errors import PublisherError
from conntrack.producer.publisher import Publisher

log = logging.getLogger(__name__)

CONNECTION_ID_HEADER: Final = "X-Connection-Id"
# Close codes that say no code was received (RFC 6455, 7.4.1); the events' "none" is 0.
_NO_CODE: Final = (1005, 1006)


class _HandshakeFailures(logging.Filter):
    """websockets logs every failed opening handshake as an ERROR with a traceback, including a
    TCP probe that connects and closes (a load balancer's or an orchestrator's health check) and
    a client that is not speaking HTTP. Neither is the gateway's fault: the probe is not logged,
    anything else is one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != "opening handshake failed" or record.exc_info is None:
            return True
        error: BaseException | None = record.exc_info[1]
        cause = error
        while cause is not None and cause.__cause__ is not None:
            cause = cause.__cause__
        if not isinstance(cause, EOFError | ConnectionError):
            log.info("event=handshake_failed error=%s", error)
        return False


def websockets_logger() -> logging.Logger:
    """The logger to hand to websockets' server (its `logger=`)."""
    logger = logging.getLogger("websockets.server")
    if not any(isinstance(f, _HandshakeFailures) for f in logger.filters):
        logger.addFilter(_HandshakeFailures())
    return logger


def connection_id(ws: ServerConnection) -> str:
    return ws.id.hex


def source_ip(ws: ServerConnection) -> str:
    """The peer's address as the socket has it (no proxy headers are trusted); an IPv4 peer on a
    dual-stack socket is given as IPv4."""
    address = ws.remote_address
    host = str(address[0]) if isinstance(address, tuple) and address else ""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def header_text(value: str) -> str:
    """A request header's value as text the events can carry. websockets decodes header bytes as
    ASCII with surrogateescape, so a non-ASCII byte (a UTF-8 User-Agent, or obs-text) arrives as
    a lone surrogate that no event can encode; the bytes are decoded as UTF-8 instead (invalid
    sequences become U+FFFD), and NUL, which events refuse, is dropped."""
    raw = value.encode("utf-8", "surrogateescape")
    return raw.decode("utf-8", "replace").replace("\x00", "")


async def _close_quietly(ws: ServerConnection, code: int, reason: str) -> None:
    """Close a socket; one that is gone already, or whose client does not answer, is closed."""
    with contextlib.suppress(Exception):
        await ws.close(code, reason)


# What gateway_sockets_closed{why} calls each cause the gateway closes a socket for.
_WHY: Final = {
    Cause.DISCONNECTED_BY_API: "api",
    Cause.GATEWAY_SHUTDOWN: "shutdown",
    Cause.IDLE_TIMEOUT: "idle_timeout",
    Cause.MAX_LIFETIME: "max_lifetime",
    Cause.GATEWAY_ERROR: "error",
    Cause.NODE_FENCED: "fenced",
}


class Gateway:
    """The sockets this node holds, the WebSocket handler that publishes their events, and the
    command handler (send / disconnect) NodeCommands calls."""

    def __init__(
        self,
        publisher: Publisher,
        handshakes: Handshakes | None = None,
        *,
        idle_timeout_s: float = 0,
        max_lifetime_s: float = 0,
    ) -> None:
        """idle_timeout_s, max_lifetime_s: close a socket that received nothing for this long,
        or that is open for longer than this (0: never); sweep() does it."""
        self._publisher = publisher
        self._handshakes = handshakes or Handshakes()
        self._idle_timeout_s = idle_timeout_s
        self._max_lifetime_s = max_lifetime_s
        self._sockets: dict[str, ServerConnection] = {}
        # When each socket connected and last received a message (the loop's clock).
        self._opened_at: dict[str, float] = {}
        self._active_at: dict[str, float] = {}
        self._closing: set[asyncio.Task[None]] = set()
        # Counters the metrics read when scraped (gateway/metrics.py).
        self.frames_received = 0
        self.frames_sent = 0
        self.handshakes_refused: dict[int, int] = {}
        self.closed_by_gateway: dict[str, int] = {}
        # The node's incarnation each socket's Connected carried.
        self._incarnations: dict[str, int] = {}
        # Why the gateway itself closed a socket (absent: the client did, or it dropped).
        self._causes: dict[str, Cause] = {}
        self._shutting_down = False
        # Who each accepted handshake is for, from process_request until its handler starts.
        self._identities: dict[str, Identity] = {}

    def check_handshake(self, ws: ServerConnection, request: Request) -> Response | None:
        """process_request hook: refuse a handshake without a valid credential (no socket, so
        no event), or remember who it is for."""
        try:
            identity = self._handshakes.identify(request.headers, request.path)
        except HandshakeRefused as exc:
            # An ordinary refusal, not the gateway's failure: logged below ERROR.
            log.info("event=handshake_refused status=%d reason=%s", exc.status, exc)
            status = int(exc.status)
            self.handshakes_refused[status] = self.handshakes_refused.get(status, 0) + 1
            response = ws.respond(exc.status, f"{exc}\n")
            if exc.status == HTTPStatus.UNAUTHORIZED and self._handshakes.mode == "jwt":
                response.headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
            return response
        if identity is not NOBODY:
            self._identities[connection_id(ws)] = identity
        return None

    @property
    def open_sockets(self) -> int:
        return len(self._sockets)

    def add_connection_id(
        self, ws: ServerConnection, request: Request, response: Response
    ) -> Response:
        """process_response hook: tell the client its connection id (and forget who a
        handshake that failed after check_handshake was for)."""
        if response.status_code != HTTPStatus.SWITCHING_PROTOCOLS:
            self._identities.pop(connection_id(ws), None)
            return response
        response.headers[CONNECTION_ID_HEADER] = connection_id(ws)
        return response

    async def handle(self, ws: ServerConnection) -> None:
        """One client, from the handshake to the close."""
        conn_id = connection_id(ws)
        user_agent = header_text(ws.request.headers.get("User-Agent", "")) if ws.request else ""
        who = self._identities.pop(conn_id, NOBODY)
        self._sockets[conn_id] = ws
        try:
            try:
                with tracing.span("websocket open", **{"conntrack.connection_id": conn_id}):
                    connected = await self._publisher.connected(
                        conn_id,
                        source_ip(ws),
                        user_agent,
                        principal=who.principal,
                        labels=dict(who.labels),
                    )
            except (PublisherError, ValueError) as exc:
                log.error("event=connected_not_published connection_id=%s error=%s", conn_id, exc)
                await ws.close(1011, "connection tracking unavailable")
                return
            assert isinstance(connected.payload, Connected)
            self._incarnations[conn_id] = connected.payload.node_incarnation
            now = asyncio.get_running_loop().time()
            self._opened_at[conn_id] = self._active_at[conn_id] = now
            log.debug("event=connected connection_id=%s", conn_id)
            try:
                loop = asyncio.get_running_loop()
                async for _ in ws:
                    self.frames_received += 1
                    self._active_at[conn_id] = loop.time()
                    await self._publisher.activity(conn_id, frames=1)
            except ConnectionClosed:
                pass
            except PublisherError as exc:
                log.error("event=activity_not_published connection_id=%s error=%s", conn_id, exc)
                self._causes[conn_id] = Cause.GATEWAY_ERROR
                await ws.close(1011, "connection tracking unavailable")
        finally:
            self._sockets.pop(conn_id, None)
            self._incarnations.pop(conn_id, None)
            self._opened_at.pop(conn_id, None)
            self._active_at.pop(conn_id, None)
        code = ws.close_code or 0
        reason = ws.close_reason or ""
        if code in _NO_CODE:
            code, reason = 0, ""
        cause = self._causes.pop(conn_id, None) or (
            Cause.GATEWAY_SHUTDOWN if self._shutting_down else Cause.CLIENT_CLOSED
        )
        if cause is not Cause.CLIENT_CLOSED:
            why = _WHY[cause]
            self.closed_by_gateway[why] = self.closed_by_gateway.get(why, 0) + 1
        try:
            with tracing.span("websocket closed", **{"conntrack.connection_id": conn_id}):
                await self._publisher.disconnected(
                    conn_id, status_code=code, reason=reason.replace("\x00", ""), cause=cause
                )
        except PublisherError as exc:
            log.error("event=disconnected_not_published connection_id=%s error=%s", conn_id, exc)
        log.debug("event=disconnected connection_id=%s code=%d", conn_id, code)

    # -- the node's commands (producer.command_execution.CommandHandler) ----------------------

    async def send(self, connection_id: str, data: bytes, data_type: DataType, /) -> bool:
        ws = self._sockets.get(connection_id)
        if ws is None:
            return False
        try:
            with tracing.span("websocket send", **{"conntrack.connection_id": connection_id}):
                # A TEXT frame must be UTF-8: invalid data fails the command (UnicodeDecodeError).
                await ws.send(data.decode("utf-8") if data_type is DataType.TEXT else data)
        except ConnectionClosed:
            return False
        self.frames_sent += 1
        return True

    async def disconnect(self, connection_id: str, status_code: int, reason: str, /) -> bool:
        ws = self._sockets.get(connection_id)
        if ws is None:
            return False
        # Waits for the client's close frame (close_timeout at most); the handler then
        # publishes Disconnected. An invalid code or a reason over 123 bytes raises: FAILED.
        self._causes[connection_id] = Cause.DISCONNECTED_BY_API
        try:
            with tracing.span("websocket close", **{"conntrack.connection_id": connection_id}):
                await ws.close(status_code, reason)
        except BaseException:
            self._causes.pop(connection_id, None)
            raise
        return True

    async def fenced(self, incarnation: int, /) -> None:
        """The lifecycle role fenced this node's incarnations up to `incarnation` (it was taken
        for lost): start a new incarnation, then close every socket of the fenced ones with
        1012 (service restart), so their clients connect again and are tracked anew."""
        try:
            await self._publisher.new_incarnation()
        finally:
            # Closed whether or not the new incarnation could be announced: the stream has told
            # them closed, and the API no longer finds them.
            fenced = [c for c, i in self._incarnations.items() if i <= incarnation]
            for conn_id in fenced:
                self._causes[conn_id] = Cause.NODE_FENCED
            await asyncio.gather(
                *(
                    ws.close(FENCED_CLOSE_CODE, "node fenced")
                    for conn_id in fenced
                    if (ws := self._sockets.get(conn_id)) is not None
                ),
                return_exceptions=True,
            )
            log.info("event=fenced_sockets_closed count=%d", len(fenced))

    async def sweep(self) -> None:
        """Until cancelled: close the sockets past the idle timeout or the maximum lifetime
        (1001, going away), each with its cause. Checks a few times per the shorter limit."""
        limits = [t for t in (self._idle_timeout_s, self._max_lifetime_s) if t > 0]
        if not limits:
            return
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, min(limits) / 4))
            now = loop.time()
            due: list[tuple[str, Cause, str]] = []
            for conn_id, opened_at in list(self._opened_at.items()):
                if conn_id in self._causes:
                    continue  # being closed already
                if self._max_lifetime_s and now - opened_at > self._max_lifetime_s:
                    due.append((conn_id, Cause.MAX_LIFETIME, "maximum lifetime"))
                elif self._idle_timeout_s and now - self._active_at[conn_id] > self._idle_timeout_s:
                    due.append((conn_id, Cause.IDLE_TIMEOUT, "idle timeout"))
            for conn_id, cause, reason in due:
                ws = self._sockets.get(conn_id)
                if ws is None:
                    continue
                self._causes[conn_id] = cause
                # Not waited for here: each close waits for its client's close frame.
                task = asyncio.create_task(_close_quietly(ws, 1001, reason))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    def shutting_down(self) -> None:
        """The node is stopping: the sockets closed from now on close for that."""
        self._shutting_down = True
