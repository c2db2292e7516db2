import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import connection_pb2 as _connection_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ConnectionFilter(_message.Message):
    __slots__ = ("node_id", "source_ip", "last_active_before", "connected_before", "connected_after", "principal", "label_selector")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_IP_FIELD_NUMBER: _ClassVar[int]
    LAST_ACTIVE_BEFORE_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_AFTER_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    LABEL_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    source_ip: str
    last_active_before: _timestamp_pb2.Timestamp
    connected_before: _timestamp_pb2.Timestamp
    connected_after: _timestamp_pb2.Timestamp
    principal: str
    label_selector: str
    def __init__(self, node_id: _Optional[str] = ..., source_ip: _Optional[str] = ..., last_active_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., connected_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., connected_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., principal: _Optional[str] = ..., label_selector: _Optional[str] = ...) -> None: ...

class ListConnectionsRequest(_message.Message):
    __slots__ = ("gateway_id", "filter", "page_size", "page_token", "as_of")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    filter: ConnectionFilter
    page_size: int
    page_token: str
    as_of: _timestamp_pb2.Timestamp
    def __init__(self, gateway_id: _Optional[str] = ..., filter: _Optional[_Union[ConnectionFilter, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class DirectoryEntry(_message.Message):
    __slots__ = ("connection", "node_id", "principal", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CONNECTION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    connection: _connection_pb2.Connection
    node_id: str
    principal: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, connection: _Optional[_Union[_connection_pb2.Connection, _Mapping]] = ..., node_id: _Optional[str] = ..., principal: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ListConnectionsResponse(_message.Message):
    __slots__ = ("connections", "next_page_token")
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    connections: _containers.RepeatedCompositeFieldContainer[DirectoryEntry]
    next_page_token: str
    def __init__(self, connections: _Optional[_Iterable[_Union[DirectoryEntry, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CountConnectionsRequest(_message.Message):
    __slots__ = ("gateway_id", "filter", "as_of")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    filter: ConnectionFilter
    as_of: _timestamp_pb2.Timestamp
    def __init__(self, gateway_id: _Optional[str] = ..., filter: _Optional[_Union[ConnectionFilter, _Mapping]] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CountConnectionsResponse(_message.Message):
    __slots__ = ("count",)
    COUNT_FIELD_NUMBER: _ClassVar[int]
    count: int
    def __init__(self, count: _Optional[int] = ...) -> None: ...

class BroadcastRequest(_message.Message):
    __slots__ = ("gateway_id", "filter", "data", "type")
    class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DATA_TYPE_UNSPECIFIED: _ClassVar[BroadcastRequest.DataType]
        BINARY: _ClassVar[BroadcastRequest.DataType]
        TEXT: _ClassVar[BroadcastRequest.DataType]
    DATA_TYPE_UNSPECIFIED: BroadcastRequest.DataType
    BINARY: BroadcastRequest.DataType
    TEXT: BroadcastRequest.DataType
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    filter: ConnectionFilter
    data: bytes
    type: BroadcastRequest.DataType
    def __init__(self, gateway_id: _Optional[str] = ..., filter: _Optional[_Union[ConnectionFilter, _Mapping]] = ..., data: _Optional[bytes] = ..., type: _Optional[_Union[BroadcastRequest.DataType, str]] = ...) -> None: ...

class BroadcastResponse(_message.Message):
    __slots__ = ("broadcast_id", "addressed", "delivered", "complete", "unreachable")
    BROADCAST_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESSED_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_FIELD_NUMBER: _ClassVar[int]
    broadcast_id: str
    addressed: int
    delivered: int
    complete: bool
    unreachable: int
    def __init__(self, broadcast_id: _Optional[str] = ..., addressed: _Optional[int] = ..., delivered: _Optional[int] = ..., complete: _Optional[bool] = ..., unreachable: _Optional[int] = ...) -> None: ...

class Targets(_message.Message):
    __slots__ = ("filter", "connection_ids", "except_connection_ids")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_IDS_FIELD_NUMBER: _ClassVar[int]
    EXCEPT_CONNECTION_IDS_FIELD_NUMBER: _ClassVar[int]
    filter: ConnectionFilter
    connection_ids: _containers.RepeatedScalarFieldContainer[str]
    except_connection_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, filter: _Optional[_Union[ConnectionFilter, _Mapping]] = ..., connection_ids: _Optional[_Iterable[str]] = ..., except_connection_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class SendToConnectionsRequest(_message.Message):
    __slots__ = ("gateway_id", "targets", "data", "type")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    targets: Targets
    data: bytes
    type: BroadcastRequest.DataType
    def __init__(self, gateway_id: _Optional[str] = ..., targets: _Optional[_Union[Targets, _Mapping]] = ..., data: _Optional[bytes] = ..., type: _Optional[_Union[BroadcastRequest.DataType, str]] = ...) -> None: ...

class DisconnectConnectionsRequest(_message.Message):
    __slots__ = ("gateway_id", "targets", "status_code", "reason")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    targets: Targets
    status_code: int
    reason: str
    def __init__(self, gateway_id: _Optional[str] = ..., targets: _Optional[_Union[Targets, _Mapping]] = ..., status_code: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class TargetOutcome(_message.Message):
    __slots__ = ("connection_id", "result", "detail")
    class Result(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        RESULT_UNSPECIFIED: _ClassVar[TargetOutcome.Result]
        DONE: _ClassVar[TargetOutcome.Result]
        GONE: _ClassVar[TargetOutcome.Result]
        NODE_LOST: _ClassVar[TargetOutcome.Result]
        NODE_UNREACHABLE: _ClassVar[TargetOutcome.Result]
        REFUSED: _ClassVar[TargetOutcome.Result]
    RESULT_UNSPECIFIED: TargetOutcome.Result
    DONE: TargetOutcome.Result
    GONE: TargetOutcome.Result
    NODE_LOST: TargetOutcome.Result
    NODE_UNREACHABLE: TargetOutcome.Result
    REFUSED: TargetOutcome.Result
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    connection_id: str
    result: TargetOutcome.Result
    detail: str
    def __init__(self, connection_id: _Optional[str] = ..., result: _Optional[_Union[TargetOutcome.Result, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class TargetedResponse(_message.Message):
    __slots__ = ("action_id", "outcomes", "done", "gone", "node_lost", "node_unreachable", "refused")
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    GONE_FIELD_NUMBER: _ClassVar[int]
    NODE_LOST_FIELD_NUMBER: _ClassVar[int]
    NODE_UNREACHABLE_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    action_id: str
    outcomes: _containers.RepeatedCompositeFieldContainer[TargetOutcome]
    done: int
    gone: int
    node_lost: int
    node_unreachable: int
    refused: int
    def __init__(self, action_id: _Optional[str] = ..., outcomes: _Optional[_Iterable[_Union[TargetOutcome, _Mapping]]] = ..., done: _Optional[int] = ..., gone: _Optional[int] = ..., node_lost: _Optional[int] = ..., node_unreachable: _Optional[int] = ..., refused: _Optional[int] = ...) -> None: ...

class GetConnectionAsOfRequest(_message.Message):
    __slots__ = ("connection_id", "as_of")
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    connection_id: str
    as_of: _timestamp_pb2.Timestamp
    def __init__(self, connection_id: _Optional[str] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ConnectionAsOf(_message.Message):
    __slots__ = ("entry", "state", "disconnected_at", "status_code", "reason", "gone_reason")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[ConnectionAsOf.State]
        OPEN: _ClassVar[ConnectionAsOf.State]
        CLOSED: _ClassVar[ConnectionAsOf.State]
        GONE: _ClassVar[ConnectionAsOf.State]
    STATE_UNSPECIFIED: ConnectionAsOf.State
    OPEN: ConnectionAsOf.State
    CLOSED: ConnectionAsOf.State
    GONE: ConnectionAsOf.State
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DISCONNECTED_AT_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    GONE_REASON_FIELD_NUMBER: _ClassVar[int]
    entry: DirectoryEntry
    state: ConnectionAsOf.State
    disconnected_at: _timestamp_pb2.Timestamp
    status_code: int
    reason: str
    gone_reason: str
    def __init__(self, entry: _Optional[_Union[DirectoryEntry, _Mapping]] = ..., state: _Optional[_Union[ConnectionAsOf.State, str]] = ..., disconnected_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., status_code: _Optional[int] = ..., reason: _Optional[str] = ..., gone_reason: _Optional[str] = ...) -> None: ...

class GetLastSeenRequest(_message.Message):
    __slots__ = ("gateway_id", "principal")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    principal: str
    def __init__(self, gateway_id: _Optional[str] = ..., principal: _Optional[str] = ...) -> None: ...

class LastSeen(_message.Message):
    __slots__ = ("connected_now", "last_seen", "connection_id")
    CONNECTED_NOW_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    connected_now: bool
    last_seen: _timestamp_pb2.Timestamp
    connection_id: str
    def __init__(self, connected_now: _Optional[bool] = ..., last_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., connection_id: _Optional[str] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("gateway_id", "principal", "window_start", "window_end", "page_size", "page_token")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_FIELD_NUMBER: _ClassVar[int]
    WINDOW_END_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    principal: str
    window_start: _timestamp_pb2.Timestamp
    window_end: _timestamp_pb2.Timestamp
    page_size: int
    page_token: str
    def __init__(self, gateway_id: _Optional[str] = ..., principal: _Optional[str] = ..., window_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., window_end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("entry", "disconnected_at", "status_code", "reason", "gone_reason")
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    DISCONNECTED_AT_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    GONE_REASON_FIELD_NUMBER: _ClassVar[int]
    entry: DirectoryEntry
    disconnected_at: _timestamp_pb2.Timestamp
    status_code: int
    reason: str
    gone_reason: str
    def __init__(self, entry: _Optional[_Union[DirectoryEntry, _Mapping]] = ..., disconnected_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., status_code: _Optional[int] = ..., reason: _Optional[str] = ..., gone_reason: _Optional[str] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions", "next_page_token")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[Session]
    next_page_token: str
    def __init__(self, sessions: _Optional[_Iterable[_Union[Session, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
