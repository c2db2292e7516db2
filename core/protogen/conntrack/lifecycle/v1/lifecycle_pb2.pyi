import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LifecycleEvent(_message.Message):
    __slots__ = ("schema_version", "event_id", "connection_id", "gateway_id", "node_id", "node_incarnation", "occurred_at", "opened", "closed")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    OPENED_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    event_id: str
    connection_id: str
    gateway_id: str
    node_id: str
    node_incarnation: int
    occurred_at: _timestamp_pb2.Timestamp
    opened: Opened
    closed: Closed
    def __init__(self, schema_version: _Optional[int] = ..., event_id: _Optional[str] = ..., connection_id: _Optional[str] = ..., gateway_id: _Optional[str] = ..., node_id: _Optional[str] = ..., node_incarnation: _Optional[int] = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., opened: _Optional[_Union[Opened, _Mapping]] = ..., closed: _Optional[_Union[Closed, _Mapping]] = ...) -> None: ...

class Opened(_message.Message):
    __slots__ = ("principal", "labels", "source_ip", "user_agent")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_IP_FIELD_NUMBER: _ClassVar[int]
    USER_AGENT_FIELD_NUMBER: _ClassVar[int]
    principal: str
    labels: _containers.ScalarMap[str, str]
    source_ip: str
    user_agent: str
    def __init__(self, principal: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., source_ip: _Optional[str] = ..., user_agent: _Optional[str] = ...) -> None: ...

class Closed(_message.Message):
    __slots__ = ("reason", "status_code", "reason_text")
    class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        REASON_UNSPECIFIED: _ClassVar[Closed.Reason]
        CLIENT_CLOSED: _ClassVar[Closed.Reason]
        DISCONNECTED_BY_API: _ClassVar[Closed.Reason]
        NODE_LOST: _ClassVar[Closed.Reason]
        NODE_RESTARTED: _ClassVar[Closed.Reason]
        IDLE_TIMEOUT: _ClassVar[Closed.Reason]
        MAX_LIFETIME: _ClassVar[Closed.Reason]
        GATEWAY_SHUTDOWN: _ClassVar[Closed.Reason]
        GATEWAY_ERROR: _ClassVar[Closed.Reason]
    REASON_UNSPECIFIED: Closed.Reason
    CLIENT_CLOSED: Closed.Reason
    DISCONNECTED_BY_API: Closed.Reason
    NODE_LOST: Closed.Reason
    NODE_RESTARTED: Closed.Reason
    IDLE_TIMEOUT: Closed.Reason
    MAX_LIFETIME: Closed.Reason
    GATEWAY_SHUTDOWN: Closed.Reason
    GATEWAY_ERROR: Closed.Reason
    REASON_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_TEXT_FIELD_NUMBER: _ClassVar[int]
    reason: Closed.Reason
    status_code: int
    reason_text: str
    def __init__(self, reason: _Optional[_Union[Closed.Reason, str]] = ..., status_code: _Optional[int] = ..., reason_text: _Optional[str] = ...) -> None: ...
