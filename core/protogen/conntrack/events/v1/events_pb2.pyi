import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ConnectionEvent(_message.Message):
    __slots__ = ("schema_version", "event_id", "connection_id", "gateway_id", "occurred_at", "node_id", "node_incarnation", "connected", "activity", "disconnected", "node_started", "node_heartbeat", "node_fenced")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    ACTIVITY_FIELD_NUMBER: _ClassVar[int]
    DISCONNECTED_FIELD_NUMBER: _ClassVar[int]
    NODE_STARTED_FIELD_NUMBER: _ClassVar[int]
    NODE_HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    NODE_FENCED_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    event_id: str
    connection_id: str
    gateway_id: str
    occurred_at: _timestamp_pb2.Timestamp
    node_id: str
    node_incarnation: int
    connected: Connected
    activity: Activity
    disconnected: Disconnected
    node_started: NodeStarted
    node_heartbeat: NodeHeartbeat
    node_fenced: NodeFenced
    def __init__(self, schema_version: _Optional[int] = ..., event_id: _Optional[str] = ..., connection_id: _Optional[str] = ..., gateway_id: _Optional[str] = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., node_id: _Optional[str] = ..., node_incarnation: _Optional[int] = ..., connected: _Optional[_Union[Connected, _Mapping]] = ..., activity: _Optional[_Union[Activity, _Mapping]] = ..., disconnected: _Optional[_Union[Disconnected, _Mapping]] = ..., node_started: _Optional[_Union[NodeStarted, _Mapping]] = ..., node_heartbeat: _Optional[_Union[NodeHeartbeat, _Mapping]] = ..., node_fenced: _Optional[_Union[NodeFenced, _Mapping]] = ...) -> None: ...

class NodeStarted(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeFenced(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeHeartbeat(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Connected(_message.Message):
    __slots__ = ("identity", "principal", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    identity: CallerIdentity
    principal: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, identity: _Optional[_Union[CallerIdentity, _Mapping]] = ..., principal: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Activity(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: int
    def __init__(self, frames: _Optional[int] = ...) -> None: ...

class Disconnected(_message.Message):
    __slots__ = ("status_code", "reason", "cause")
    class Cause(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CAUSE_UNSPECIFIED: _ClassVar[Disconnected.Cause]
        CLIENT_CLOSED: _ClassVar[Disconnected.Cause]
        DISCONNECTED_BY_API: _ClassVar[Disconnected.Cause]
        GATEWAY_SHUTDOWN: _ClassVar[Disconnected.Cause]
        IDLE_TIMEOUT: _ClassVar[Disconnected.Cause]
        MAX_LIFETIME: _ClassVar[Disconnected.Cause]
        GATEWAY_ERROR: _ClassVar[Disconnected.Cause]
        NODE_FENCED: _ClassVar[Disconnected.Cause]
    CAUSE_UNSPECIFIED: Disconnected.Cause
    CLIENT_CLOSED: Disconnected.Cause
    DISCONNECTED_BY_API: Disconnected.Cause
    GATEWAY_SHUTDOWN: Disconnected.Cause
    IDLE_TIMEOUT: Disconnected.Cause
    MAX_LIFETIME: Disconnected.Cause
    GATEWAY_ERROR: Disconnected.Cause
    NODE_FENCED: Disconnected.Cause
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    status_code: int
    reason: str
    cause: Disconnected.Cause
    def __init__(self, status_code: _Optional[int] = ..., reason: _Optional[str] = ..., cause: _Optional[_Union[Disconnected.Cause, str]] = ...) -> None: ...

class CallerIdentity(_message.Message):
    __slots__ = ("source_ip", "user_agent")
    SOURCE_IP_FIELD_NUMBER: _ClassVar[int]
    USER_AGENT_FIELD_NUMBER: _ClassVar[int]
    source_ip: str
    user_agent: str
    def __init__(self, source_ip: _Optional[str] = ..., user_agent: _Optional[str] = ...) -> None: ...
