"""The connection directory: a gateway's open connections, listed a page at a time or counted
(conntrack.directory.v1.ConnectionDirectoryService, proto/conntrack/directory/v1/directory.proto;
docs/api.md, "Connection directory").

ConnectionDirectory is the transport-neutral core (plain values in, views and a token out;
InvalidDirectoryRequest and DirectoryUnavailable as its errors), so the gRPC servicer below and
an HTTP route call the same code. "Open" is what Get finds: connected, not disconnected, and
not gone by the liveness rules at the time of the call (core/liveness.py; the
rules become SQL conditions in api/read/repository.py, so pages and counts need no filtering after
the query).

Paging is by keyset: connections in connection_id order, a page token holding the last id of
the page. Connections that connect or disconnect between pages move no other connection, so a
connection open for the whole listing is listed exactly once, whatever else changes."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import astuple, dataclass
from typing import Any, Final, Protocol, TypeVar

import grpc
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from conntrack.api.application.call import ApiError, Call, UndecodableRequest
from conntrack.api.application.freshness import ProjectionPosition
from conntrack.api.application.service import to_proto
from conntrack.api.read.reading import SharedReading
from conntrack.api.read.repository import (
    ConnectionRepository,
    ConnectionView,
    DirectoryFilter,
    ReadModelUnavailable,
)
from conntrack.core.ids import id_problem
from conntrack.core.labels import SelectorError, from_json, parse_selector, principal_problem
from conntrack.core.liveness import Liveness
from conntrack.core.protogen.conntrack.directory.v1 import directory_pb2
from conntrack.core.settings import default
from conntrack.core.timeutil import to_ns

log = logging.getLogger(__name__)

T = TypeVar("T")

DIRECTORY_SERVICE: Final = directory_pb2.DESCRIPTOR.services_by_name["ConnectionDirectoryService"]
DIRECTORY_SERVICE_NAME: Final = DIRECTORY_SERVICE.full_name

DEFAULT_PAGE_SIZE: Final = 100
MAX_PAGE_SIZE: Final = 1000
MAX_SOURCE_IP_LENGTH: Final = 1024
# A token holds one connection id (at most MAX_ID_LENGTH code points, 4 bytes each) and its tag.
MAX_PAGE_TOKEN_LENGTH: Final = 2048

_TOKEN_VERSION: Final = 1
_TAG_BYTES: Final = 16
_TAG_PERSON: Final = b"conntrack.dir.v1"  # blake2b personalization: at most 16 bytes

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1


class InvalidDirectoryRequest(ValueError):
    """A request the directory refuses (a message naming the field): INVALID_ARGUMENT, or
    400 over HTTP."""


class DirectoryUnavailable(RuntimeError):
    """The read model did not answer (in time): UNAVAILABLE, or 503 over HTTP; retry."""


def _ns_problem(name: str, ns: int | None) -> str | None:
    if ns is not None and not _INT64_MIN <= ns <= _INT64_MAX:
        return f"{name} is out of range (nanoseconds since the epoch must fit 64 bits)"
    return None


def directory_filter(
    gateway_id: str,
    *,
    node_id: str = "",
    source_ip: str = "",
    last_active_before_ns: int | None = None,
    connected_before_ns: int | None = None,
    connected_after_ns: int | None = None,
    principal: str = "",
    label_selector: str = "",
) -> DirectoryFilter:
    """The filter of a request; empty strings and None do not filter. Raises
    InvalidDirectoryRequest naming the first invalid field."""
    problem = (
        id_problem("gateway_id", gateway_id)
        or id_problem("filter.node_id", node_id, required=False)
        or principal_problem("filter.principal", principal)
        or _ns_problem("filter.last_active_before", last_active_before_ns)
        or _ns_problem("filter.connected_before", connected_before_ns)
        or _ns_problem("filter.connected_after", connected_after_ns)
    )
    if not problem and len(source_ip) > MAX_SOURCE_IP_LENGTH:
        problem = f"filter.source_ip must be at most {MAX_SOURCE_IP_LENGTH} characters"
    if not problem and "\x00" in source_ip:
        problem = "filter.source_ip must not contain NUL"
    if problem:
        raise InvalidDirectoryRequest(problem)
    try:
        labels = parse_selector(label_selector, "filter.label_selector")
    except SelectorError as exc:
        raise InvalidDirectoryRequest(str(exc)) from None
    return DirectoryFilter(
        gateway_id=gateway_id,
        node_id=node_id or None,
        source_ip=source_ip or None,
        last_active_before_ns=last_active_before_ns,
        connected_before_ns=connected_before_ns,
        connected_after_ns=connected_after_ns,
        principal=principal or None,
        labels=labels,
    )


def page_size_of(requested: int) -> int:
    """The page size to use: 0 means DEFAULT_PAGE_SIZE; negative or above MAX_PAGE_SIZE is
    refused (InvalidDirectoryRequest), not silently capped."""
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    if requested < 0:
        raise InvalidDirectoryRequest(f"page_size must not be negative, got {requested}")
    if requested > MAX_PAGE_SIZE:
        raise InvalidDirectoryRequest(f"page_size must be at most {MAX_PAGE_SIZE}, got {requested}")
    return requested


def _tag(where: DirectoryFilter, payload: bytes) -> bytes:
    """Binds a token to its query: the same gateway and filter, or the token is refused. Not a
    secret-keyed MAC: a token grants nothing (any caller may list the gateway from its start),
    it only must not be misread, so corruption and reuse with another query are detected."""
    query = json.dumps(astuple(where), ensure_ascii=False).encode()
    digest = hashlib.blake2b(digest_size=_TAG_BYTES, person=_TAG_PERSON)
    digest.update(len(query).to_bytes(4, "big"))
    digest.update(query)
    digest.update(payload)
    return digest.digest()


def encode_page_token(where: DirectoryFilter, last_id: str) -> str:
    """An opaque token: version, the last connection id of the page, a tag binding both to the
    query; URL-safe base64 without padding."""
    payload = bytes([_TOKEN_VERSION]) + last_id.encode()
    return base64.urlsafe_b64encode(payload + _tag(where, payload)).rstrip(b"=").decode()


_INVALID_TOKEN: Final = (
    "page_token is not valid for this query: pass next_page_token of the previous page "
    "unchanged, with the same gateway_id and filter"
)


def decode_page_token(where: DirectoryFilter, token: str) -> str | None:
    """The last connection id a token holds (None for the empty token: the first page).
    Raises InvalidDirectoryRequest for anything encode_page_token did not make for `where`."""
    if not token:
        return None
    if len(token) > MAX_PAGE_TOKEN_LENGTH or not token.isascii():
        raise InvalidDirectoryRequest(_INVALID_TOKEN)
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise InvalidDirectoryRequest(_INVALID_TOKEN) from None
    payload, tag = raw[:-_TAG_BYTES], raw[-_TAG_BYTES:]
    # Re-encoding must give the token back: no padding, no non-alphabet characters, no
    # trailing bits (base64 decoding alone accepts several spellings of the same bytes).
    canonical = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    if (
        len(raw) < _TAG_BYTES + 2
        or canonical != token
        or payload[0] != _TOKEN_VERSION
        or not hmac.compare_digest(tag, _tag(where, payload))
    ):
        raise InvalidDirectoryRequest(_INVALID_TOKEN)
    try:
        return payload[1:].decode()
    except UnicodeDecodeError:  # a matching tag over invalid UTF-8: not one of ours
        raise InvalidDirectoryRequest(_INVALID_TOKEN) from None


@dataclass(frozen=True, slots=True)
class DirectoryPage:
    connections: Sequence[ConnectionView]
    next_page_token: str  # empty on the last page
    # The projection's position, as Get sends it (api/application/freshness.py): header name, value.
    freshness: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class DirectoryCount:
    count: int
    freshness: tuple[tuple[str, str], ...]


class ConnectionDirectory:
    """Lists and counts a gateway's open connections. Transport-neutral: raises
    InvalidDirectoryRequest for bad input, DirectoryUnavailable when the read model does not
    answer within db_timeout_seconds."""

    def __init__(
        self,
        repository: ConnectionRepository,
        *,
        liveness: Liveness | None = None,
        db_timeout_seconds: float = default("api_db_timeout_seconds"),
        freshness_ttl_seconds: float = default("api_freshness_ttl_ms") / 1000,
    ) -> None:
        self._repository = repository
        self._liveness = liveness or Liveness.of_seconds(
            default("node_lease_seconds"),
            default("connection_idle_timeout_seconds"),
            default("connection_max_lifetime_seconds"),
        )
        self._db_timeout = db_timeout_seconds
        self._position = ProjectionPosition(repository, freshness_ttl_seconds)
        # As in ConnectionService: the nodes' state is read at most once per freshness TTL.
        self._nodes = SharedReading(repository.nodes, freshness_ttl_seconds)

    @property
    def liveness(self) -> Liveness:
        return self._liveness

    async def freshness(self) -> tuple[tuple[str, str], ...]:
        """The projection's position, as every answer carries it (freshness headers)."""
        return await self._position.metadata()

    async def list_connections(
        self, where: DirectoryFilter, *, page_size: int = 0, page_token: str = ""
    ) -> DirectoryPage:
        """One page of `where` (build it with directory_filter()); page_size 0 is the
        default size; page_token is the previous page's next_page_token ("" for the first)."""
        size = page_size_of(page_size)
        after = decode_page_token(where, page_token)

        async def read() -> DirectoryPage:
            # Position first: the header is then a lower bound of what the rows reflect.
            freshness = await self._position.metadata()
            live = self._liveness.bounds((await self._nodes.get())[0], time.time_ns())
            views, next_after = await self._repository.list_open(where, live, after, size)
            token = encode_page_token(where, next_after) if next_after is not None else ""
            return DirectoryPage(views, token, freshness)

        return await self.bounded(read())

    async def count_connections(self, where: DirectoryFilter) -> DirectoryCount:
        async def read() -> DirectoryCount:
            freshness = await self._position.metadata()
            live = self._liveness.bounds((await self._nodes.get())[0], time.time_ns())
            return DirectoryCount(await self._repository.count_open(where, live), freshness)

        return await self.bounded(read())

    async def lookup(
        self, gateway_id: str, connection_ids: Sequence[str]
    ) -> dict[str, ConnectionView | str]:
        """Each id's view when it is an open connection of the gateway (what Get finds), else
        why not: "node lost", "node restarted", "idle", "lifetime", "closed" (unknown,
        disconnected or of another gateway)."""

        async def read() -> dict[str, ConnectionView | str]:
            views = await asyncio.gather(*map(self._repository.get_open, connection_ids))
            live = self._liveness.bounds((await self._nodes.get())[0], time.time_ns())
            out: dict[str, ConnectionView | str] = {}
            for cid, view in zip(connection_ids, views, strict=True):
                if view is None or view.gateway_id != gateway_id:
                    out[cid] = "closed"
                    continue
                gone = live.gone(
                    node_id=view.node_id,
                    node_incarnation=view.node_incarnation,
                    connected_at_ns=view.connected_at_ns,
                    last_active_at_ns=view.last_active_at_ns,
                )
                out[cid] = view if gone is None else gone
            return out

        return await self.bounded(read())

    async def bounded(self, read: Awaitable[T]) -> T:
        """`read`, bounded by db_timeout_seconds; DirectoryUnavailable if it fails or is late."""
        try:
            async with asyncio.timeout(self._db_timeout):
                return await read
        except TimeoutError:
            log.warning("read model did not answer within %.1fs", self._db_timeout)
            raise DirectoryUnavailable(
                f"read model did not answer within {self._db_timeout:g}s; retry"
            ) from None
        except ReadModelUnavailable as exc:
            log.warning("read model unavailable: %s", exc)
            raise DirectoryUnavailable("read model is unavailable; retry") from exc


def timestamp_ns(name: str, message: Any, field: str) -> int | None:
    if not message.HasField(field):
        return None
    ts: Timestamp = getattr(message, field)
    if not 0 <= ts.nanos < 1_000_000_000:
        raise InvalidDirectoryRequest(f"{name}.nanos must be in [0, 999999999]")
    return to_ns(ts)


def filter_from_proto(gateway_id: str, f: directory_pb2.ConnectionFilter) -> DirectoryFilter:
    return directory_filter(
        gateway_id,
        node_id=f.node_id,
        source_ip=f.source_ip,
        last_active_before_ns=timestamp_ns("filter.last_active_before", f, "last_active_before"),
        connected_before_ns=timestamp_ns("filter.connected_before", f, "connected_before"),
        connected_after_ns=timestamp_ns("filter.connected_after", f, "connected_after"),
        principal=f.principal,
        label_selector=f.label_selector,
    )


def entry_proto(view: ConnectionView) -> directory_pb2.DirectoryEntry:
    return directory_pb2.DirectoryEntry(
        connection=to_proto(view),
        node_id=view.node_id or "",
        principal=view.principal or "",
        labels=from_json(view.labels),
    )


BroadcastMethod = Callable[
    [directory_pb2.BroadcastRequest | UndecodableRequest, Call],
    Awaitable[directory_pb2.BroadcastResponse],
]


SendToMethod = Callable[
    [directory_pb2.SendToConnectionsRequest | UndecodableRequest, Call],
    Awaitable[directory_pb2.TargetedResponse],
]
DisconnectManyMethod = Callable[
    [directory_pb2.DisconnectConnectionsRequest | UndecodableRequest, Call],
    Awaitable[directory_pb2.TargetedResponse],
]


class HistoryMethods(Protocol):
    """The directory's methods in time (api/application/history.py, HistoryRpc)."""

    async def list_at(
        self, where: DirectoryFilter, request: directory_pb2.ListConnectionsRequest, call: Call
    ) -> directory_pb2.ListConnectionsResponse: ...

    async def count_at(
        self, where: DirectoryFilter, request: directory_pb2.CountConnectionsRequest, call: Call
    ) -> directory_pb2.CountConnectionsResponse: ...

    async def get_connection_as_of(
        self, request: directory_pb2.GetConnectionAsOfRequest | UndecodableRequest, call: Call
    ) -> directory_pb2.ConnectionAsOf: ...

    async def get_last_seen(
        self, request: directory_pb2.GetLastSeenRequest | UndecodableRequest, call: Call
    ) -> directory_pb2.LastSeen: ...

    async def list_sessions(
        self, request: directory_pb2.ListSessionsRequest | UndecodableRequest, call: Call
    ) -> directory_pb2.ListSessionsResponse: ...


class ConnectionDirectoryService:
    """ConnectionDirectoryService's methods over ConnectionDirectory, on a Call of either
    transport. broadcast: Broadcast's implementation (api/application/broadcast.py,
    BroadcastRpc); send_to and disconnect: SendToConnections' and DisconnectConnections'
    (api/application/targets.py, TargetedRpc); without them those are UNIMPLEMENTED."""

    def __init__(
        self,
        directory: ConnectionDirectory,
        broadcast: BroadcastMethod | None = None,
        send_to: SendToMethod | None = None,
        disconnect: DisconnectManyMethod | None = None,
        history: HistoryMethods | None = None,
    ) -> None:
        self._directory = directory
        self._broadcast = broadcast
        self._send_to = send_to
        self._disconnect = disconnect
        self._history = history

    def _in_time(self) -> HistoryMethods:
        if self._history is None:
            raise ApiError(grpc.StatusCode.UNIMPLEMENTED, "this server keeps no history")
        return self._history

    async def GetConnectionAsOf(
        self, request: directory_pb2.GetConnectionAsOfRequest | UndecodableRequest, call: Call
    ) -> directory_pb2.ConnectionAsOf:
        return await self._in_time().get_connection_as_of(request, call)

    async def GetLastSeen(
        self, request: directory_pb2.GetLastSeenRequest | UndecodableRequest, call: Call
    ) -> directory_pb2.LastSeen:
        return await self._in_time().get_last_seen(request, call)

    async def ListSessions(
        self, request: directory_pb2.ListSessionsRequest | UndecodableRequest, call: Call
    ) -> directory_pb2.ListSessionsResponse:
        return await self._in_time().list_sessions(request, call)

    async def SendToConnections(
        self,
        request: directory_pb2.SendToConnectionsRequest | UndecodableRequest,
        call: Call,
    ) -> directory_pb2.TargetedResponse:
        if self._send_to is None:
            raise ApiError(grpc.StatusCode.UNIMPLEMENTED, "this server does not send to many")
        return await self._send_to(request, call)

    async def DisconnectConnections(
        self,
        request: directory_pb2.DisconnectConnectionsRequest | UndecodableRequest,
        call: Call,
    ) -> directory_pb2.TargetedResponse:
        if self._disconnect is None:
            raise ApiError(grpc.StatusCode.UNIMPLEMENTED, "this server does not disconnect many")
        return await self._disconnect(request, call)

    async def Broadcast(
        self,
        request: directory_pb2.BroadcastRequest | UndecodableRequest,
        call: Call,
    ) -> directory_pb2.BroadcastResponse:
        if self._broadcast is None:
            raise ApiError(grpc.StatusCode.UNIMPLEMENTED, "this server does not broadcast")
        return await self._broadcast(request, call)

    async def ListConnections(
        self,
        request: directory_pb2.ListConnectionsRequest | UndecodableRequest,
        call: Call,
    ) -> directory_pb2.ListConnectionsResponse:
        try:
            valid = decoded(request)
            where = filter_from_proto(valid.gateway_id, valid.filter)
            if valid.HasField("as_of"):
                return await self._in_time().list_at(where, valid, call)
            page = await self._directory.list_connections(
                where, page_size=valid.page_size, page_token=valid.page_token
            )
        except InvalidDirectoryRequest as exc:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except DirectoryUnavailable as exc:
            raise ApiError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        call.set_trailing_metadata(page.freshness)
        return directory_pb2.ListConnectionsResponse(
            connections=[entry_proto(v) for v in page.connections],
            next_page_token=page.next_page_token,
        )

    async def CountConnections(
        self,
        request: directory_pb2.CountConnectionsRequest | UndecodableRequest,
        call: Call,
    ) -> directory_pb2.CountConnectionsResponse:
        try:
            valid = decoded(request)
            where = filter_from_proto(valid.gateway_id, valid.filter)
            if valid.HasField("as_of"):
                return await self._in_time().count_at(where, valid, call)
            counted = await self._directory.count_connections(where)
        except InvalidDirectoryRequest as exc:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except DirectoryUnavailable as exc:
            raise ApiError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        call.set_trailing_metadata(counted.freshness)
        return directory_pb2.CountConnectionsResponse(count=counted.count)


M = TypeVar("M", bound=Message)


def decoded(request: M | UndecodableRequest) -> M:
    """The request, or InvalidDirectoryRequest for one that could not be decoded."""
    if isinstance(request, UndecodableRequest):
        raise InvalidDirectoryRequest(
            f"request is not a valid {request.message_type} "
            f"(string fields must be valid UTF-8): {request.reason}"
        )
    return request
