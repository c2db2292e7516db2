"""Presence in time, answered by the directory (docs/history.md): a gateway's connections open
at a past moment (listed or counted, with the directory's filters), a connection as of a moment,
a principal's last sighting and its sessions over a window.

Transport-neutral like ConnectionDirectory (api/application/directory.py), whose errors it
raises, plus HistoryNotKept for a moment the kept history does not reach. Every answer about a
moment equals the fold of the events that occurred by then, judged by the liveness rules at that
moment but the idle rule (core/history.py); tests/integration/test_history.py checks it against
a replay of the log."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final

import grpc

from conntrack.api.application.call import ApiError, Call, UndecodableRequest
from conntrack.api.application.directory import (
    ConnectionDirectory,
    DirectoryCount,
    DirectoryPage,
    DirectoryUnavailable,
    InvalidDirectoryRequest,
    decode_page_token,
    decoded,
    directory_filter,
    encode_page_token,
    entry_proto,
    page_size_of,
    timestamp_ns,
)
from conntrack.api.read.history import HistoryReader, PastConnection
from conntrack.api.read.reading import SharedReading
from conntrack.api.read.repository import DirectoryFilter
from conntrack.core.history import oldest_answered
from conntrack.core.ids import id_problem
from conntrack.core.labels import from_json, matches
from conntrack.core.liveness import Liveness
from conntrack.core.protogen.conntrack.directory.v1 import directory_pb2
from conntrack.core.timeutil import format_ns, to_timestamp

# Connections a count with a label selector reads at a time.
COUNT_CHUNK: Final = 5000
# How long the moment since which history is kept is reused before it is read again.
SINCE_TTL_S: Final = 5.0


class HistoryNotKept(RuntimeError):
    """A moment before the oldest the read model keeps: FAILED_PRECONDITION (400 over HTTP)."""


@dataclass(frozen=True, slots=True)
class ConnectionAt:
    connection: PastConnection
    state: str  # "open", "closed" or "gone"
    gone_reason: str | None


@dataclass(frozen=True, slots=True)
class LastSeenAnswer:
    connected_now: bool
    last_seen_ns: int | None
    connection_id: str | None


@dataclass(frozen=True, slots=True)
class Session:
    connection: PastConnection
    gone_reason: str | None  # an open connection that a liveness rule judges gone now


@dataclass(frozen=True, slots=True)
class SessionsPage:
    sessions: Sequence[Session]
    next_page_token: str


class ConnectionHistory:
    """Answers in time over the read model's history. history_days: how far back the
    projector keeps it (retention, core/history_store.py); a moment is answered when it is
    within that many days and at least a lease after the read model began keeping node
    sightings."""

    def __init__(
        self,
        reader: HistoryReader,
        directory: ConnectionDirectory,
        liveness: Liveness,
        history_days: int,
    ) -> None:
        self._reader = reader
        self._directory = directory
        self._liveness = liveness
        self._history_days = history_days
        # Written once per generation of the read model: read again at most every few seconds.
        self._since = SharedReading(self._read_since, SINCE_TTL_S)

    async def _read_since(self) -> tuple[int | None]:
        return (await self._reader.since(),)

    async def freshness(self) -> tuple[tuple[str, str], ...]:
        return await self._directory.bounded(self._directory.freshness())

    async def oldest_ns(self, now_ns: int) -> int | None:
        """The oldest moment answered now (None: no history is kept yet, or none at all)."""
        (since,), _ = await self._since.get()
        return oldest_answered(since, now_ns, self._history_days, self._liveness.node_lease_ns)

    async def _check(self, name: str, at_ns: int) -> None:
        now = time.time_ns()
        if at_ns > now:
            raise InvalidDirectoryRequest(f"{name} is in the future")
        oldest = await self._directory.bounded(self.oldest_ns(now))
        if oldest is None:
            raise HistoryNotKept(
                f"{name}: no history is kept yet (history_days is 0, or the projector has not "
                "run since the history was added); `conntrack-audit as-of` replays the log "
                "instead"
            )
        if at_ns < oldest:
            raise HistoryNotKept(
                f"{name} is before the oldest moment kept, {format_ns(oldest)}; "
                "`conntrack-audit as-of` replays the log to any moment it still holds"
            )

    async def list_at(
        self, where: DirectoryFilter, at_ns: int, *, page_size: int = 0, page_token: str = ""
    ) -> DirectoryPage:
        """One page of the connections of `where` open at at_ns, in connection_id order."""
        _no_activity_filter(where)
        size = page_size_of(page_size)
        after = _after_id(decode_page_token(where, page_token), at_ns)
        await self._check("as_of", at_ns)

        async def read() -> DirectoryPage:
            freshness = await self._directory.freshness()
            live = await self._reader.bounds_at(self._liveness, at_ns)
            rows = await self._reader.page_at(where, live, at_ns, after, size + 1)
            more = len(rows) > size
            rows = rows[:size]
            views = [
                r.view
                for r in rows
                if not where.labels or matches(where.labels, from_json(r.view.labels))
            ]
            token = encode_page_token(where, f"{at_ns}/{rows[-1].view.id}") if more else ""
            return DirectoryPage(views, token, freshness)

        return await self._directory.bounded(read())

    async def count_at(self, where: DirectoryFilter, at_ns: int) -> DirectoryCount:
        _no_activity_filter(where)
        await self._check("as_of", at_ns)

        async def read() -> DirectoryCount:
            freshness = await self._directory.freshness()
            live = await self._reader.bounds_at(self._liveness, at_ns)
            if not where.labels:
                return DirectoryCount(await self._reader.count_at(where, live, at_ns), freshness)
            count, after = 0, None
            while True:
                rows = await self._reader.page_at(where, live, at_ns, after, COUNT_CHUNK)
                count += sum(matches(where.labels, from_json(r.view.labels)) for r in rows)
                if len(rows) < COUNT_CHUNK:
                    return DirectoryCount(count, freshness)
                after = rows[-1].view.id

        return await self._directory.bounded(read())

    async def connection_at(self, connection_id: str, at_ns: int) -> ConnectionAt | None:
        """The connection as it stood at at_ns; None when it had not connected by then (or
        is not kept)."""
        await self._check("as_of", at_ns)

        async def read() -> ConnectionAt | None:
            past = await self._reader.connection(connection_id)
            if past is None or past.view.connected_at_ns > at_ns:
                return None
            if past.disconnected_at_ns is not None and past.disconnected_at_ns <= at_ns:
                return ConnectionAt(past, "closed", None)
            live = await self._reader.bounds_at(self._liveness, at_ns)
            v = past.view
            gone = live.gone(
                node_id=v.node_id,
                node_incarnation=v.node_incarnation,
                connected_at_ns=v.connected_at_ns,
                last_active_at_ns=v.last_active_at_ns,
            )
            return ConnectionAt(past, "open" if gone is None else "gone", gone)

        return await self._directory.bounded(read())

    async def last_seen(self, where: DirectoryFilter) -> LastSeenAnswer:
        """`where` names the gateway and the principal."""
        assert where.principal is not None
        principal = where.principal
        now = await self._directory.list_connections(where, page_size=1)
        seen = await self._directory.bounded(self._reader.last_seen(where.gateway_id, principal))
        return LastSeenAnswer(
            bool(now.connections),
            None if seen is None else seen[0],
            None if seen is None else seen[1],
        )

    async def sessions(
        self,
        where: DirectoryFilter,
        start_ns: int,
        end_ns: int | None,
        *,
        page_size: int = 0,
        page_token: str = "",
    ) -> SessionsPage:
        """The principal's sessions overlapping [start_ns, end_ns) (end None: now)."""
        assert where.principal is not None
        size = page_size_of(page_size)
        # No connection connects after now: a later end reads the same sessions (and a
        # timestamp past the year 2262 would not fit the database's 64 bits).
        now = time.time_ns()
        end = now if end_ns is None else min(end_ns, now)
        if end <= start_ns:
            raise InvalidDirectoryRequest("window_end must be after window_start")
        after = _after_session(decode_page_token(where, page_token), start_ns)
        await self._check("window_start", start_ns)
        rows = await self._directory.bounded(
            self._reader.sessions(where.gateway_id, where.principal, start_ns, end, after, size + 1)
        )
        more = len(rows) > size
        rows = rows[:size]
        still_open = [r.view.id for r in rows if r.disconnected_at_ns is None]
        judged = await self._directory.lookup(where.gateway_id, still_open) if still_open else {}
        sessions = [
            Session(r, _reason(judged.get(r.view.id)) if r.disconnected_at_ns is None else None)
            for r in rows
        ]
        token = ""
        if more:
            last = rows[-1].view
            token = encode_page_token(where, f"{start_ns}/{last.connected_at_ns}/{last.id}")
        return SessionsPage(sessions, token)


def _reason(judged: object) -> str | None:
    return judged if isinstance(judged, str) and judged != "closed" else None


def _no_activity_filter(where: DirectoryFilter) -> None:
    if where.last_active_before_ns is not None:
        raise InvalidDirectoryRequest(
            "filter.last_active_before cannot be combined with as_of: activity is not kept "
            "moment by moment"
        )


_INVALID_TOKEN: Final = "page_token is not valid for this query (another as_of or window?)"


def _after_id(payload: str | None, at_ns: int) -> str | None:
    """A past page's token holds its moment and the last id."""
    if payload is None:
        return None
    moment, _, last_id = payload.partition("/")
    if moment != str(at_ns):
        raise InvalidDirectoryRequest(_INVALID_TOKEN)
    return last_id


def _after_session(payload: str | None, start_ns: int) -> tuple[int, str] | None:
    if payload is None:
        return None
    parts = payload.split("/", 2)
    if len(parts) != 3 or parts[0] != str(start_ns) or not parts[1].lstrip("-").isdigit():
        raise InvalidDirectoryRequest(_INVALID_TOKEN)
    return int(parts[1]), parts[2]


@asynccontextmanager
async def _errors() -> AsyncIterator[None]:
    """The history's errors as the call's status."""
    try:
        yield
    except InvalidDirectoryRequest as exc:
        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
    except HistoryNotKept as exc:
        raise ApiError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
    except DirectoryUnavailable as exc:
        raise ApiError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None


def _required_ns(name: str, message: object, field: str) -> int:
    at = timestamp_ns(name, message, field)
    if at is None:
        raise InvalidDirectoryRequest(f"{name} is required")
    return at


_STATES: Final = {
    "open": directory_pb2.ConnectionAsOf.OPEN,
    "closed": directory_pb2.ConnectionAsOf.CLOSED,
    "gone": directory_pb2.ConnectionAsOf.GONE,
}


class HistoryRpc:
    """ConnectionDirectoryService's methods in time, over ConnectionHistory, on a Call of
    either transport (ListConnections and CountConnections come here when as_of is set)."""

    def __init__(self, history: ConnectionHistory) -> None:
        self._history = history

    async def list_at(
        self, where: DirectoryFilter, request: directory_pb2.ListConnectionsRequest, call: Call
    ) -> directory_pb2.ListConnectionsResponse:
        async with _errors():
            at = _required_ns("as_of", request, "as_of")
            page = await self._history.list_at(
                where, at, page_size=request.page_size, page_token=request.page_token
            )
        call.set_trailing_metadata(page.freshness)
        return directory_pb2.ListConnectionsResponse(
            connections=[entry_proto(v) for v in page.connections],
            next_page_token=page.next_page_token,
        )

    async def count_at(
        self, where: DirectoryFilter, request: directory_pb2.CountConnectionsRequest, call: Call
    ) -> directory_pb2.CountConnectionsResponse:
        async with _errors():
            counted = await self._history.count_at(where, _required_ns("as_of", request, "as_of"))
        call.set_trailing_metadata(counted.freshness)
        return directory_pb2.CountConnectionsResponse(count=counted.count)

    async def get_connection_as_of(
        self, request: directory_pb2.GetConnectionAsOfRequest | UndecodableRequest, call: Call
    ) -> directory_pb2.ConnectionAsOf:
        async with _errors():
            valid = decoded(request)
            problem = id_problem("connection_id", valid.connection_id)
            if problem:
                raise InvalidDirectoryRequest(problem)
            at = _required_ns("as_of", valid, "as_of")
            found = await self._history.connection_at(valid.connection_id, at)
            call.set_trailing_metadata(await self._history.freshness())
        if found is None:
            raise ApiError(
                grpc.StatusCode.NOT_FOUND,
                f"connection {valid.connection_id!r} had not connected by {format_ns(at)} "
                "(or is not kept)",
            )
        past = found.connection
        out = directory_pb2.ConnectionAsOf(
            entry=entry_proto(past.view),
            state=_STATES[found.state],
            gone_reason=found.gone_reason or "",
        )
        if found.state == "closed":
            assert past.disconnected_at_ns is not None
            out.disconnected_at.CopyFrom(to_timestamp(past.disconnected_at_ns))
            out.status_code = past.status_code or 0
            out.reason = past.reason or ""
        return out

    async def get_last_seen(
        self, request: directory_pb2.GetLastSeenRequest | UndecodableRequest, call: Call
    ) -> directory_pb2.LastSeen:
        async with _errors():
            valid = decoded(request)
            where = _of_principal(valid.gateway_id, valid.principal)
            seen = await self._history.last_seen(where)
            call.set_trailing_metadata(await self._history.freshness())
        out = directory_pb2.LastSeen(
            connected_now=seen.connected_now, connection_id=seen.connection_id or ""
        )
        if seen.last_seen_ns is not None:
            out.last_seen.CopyFrom(to_timestamp(seen.last_seen_ns))
        return out

    async def list_sessions(
        self, request: directory_pb2.ListSessionsRequest | UndecodableRequest, call: Call
    ) -> directory_pb2.ListSessionsResponse:
        async with _errors():
            valid = decoded(request)
            where = _of_principal(valid.gateway_id, valid.principal)
            start = _required_ns("window_start", valid, "window_start")
            end = timestamp_ns("window_end", valid, "window_end")
            page = await self._history.sessions(
                where, start, end, page_size=valid.page_size, page_token=valid.page_token
            )
            call.set_trailing_metadata(await self._history.freshness())
        return directory_pb2.ListSessionsResponse(
            sessions=[_session_proto(s) for s in page.sessions],
            next_page_token=page.next_page_token,
        )


def _of_principal(gateway_id: str, principal: str) -> DirectoryFilter:
    if not principal:
        raise InvalidDirectoryRequest("principal is required")
    return directory_filter(gateway_id, principal=principal)


def _session_proto(session: Session) -> directory_pb2.Session:
    past = session.connection
    out = directory_pb2.Session(
        entry=entry_proto(past.view),
        status_code=past.status_code or 0,
        reason=past.reason or "",
        gone_reason=session.gone_reason or "",
    )
    if past.disconnected_at_ns is not None:
        out.disconnected_at.CopyFrom(to_timestamp(past.disconnected_at_ns))
    return out
