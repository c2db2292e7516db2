import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Command(_message.Message):
    __slots__ = ("schema_version", "command_id", "node_id", "node_incarnation", "connection_id", "issued_at", "expires_at", "reply_to", "send", "disconnect", "broadcast", "disconnect_many", "fenced")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REPLY_TO_FIELD_NUMBER: _ClassVar[int]
    SEND_FIELD_NUMBER: _ClassVar[int]
    DISCONNECT_FIELD_NUMBER: _ClassVar[int]
    BROADCAST_FIELD_NUMBER: _ClassVar[int]
    DISCONNECT_MANY_FIELD_NUMBER: _ClassVar[int]
    FENCED_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    command_id: str
    node_id: str
    node_incarnation: int
    connection_id: str
    issued_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    reply_to: str
    send: Send
    disconnect: Disconnect
    broadcast: Broadcast
    disconnect_many: DisconnectMany
    fenced: Fenced
    def __init__(self, schema_version: _Optional[int] = ..., command_id: _Optional[str] = ..., node_id: _Optional[str] = ..., node_incarnation: _Optional[int] = ..., connection_id: _Optional[str] = ..., issued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reply_to: _Optional[str] = ..., send: _Optional[_Union[Send, _Mapping]] = ..., disconnect: _Optional[_Union[Disconnect, _Mapping]] = ..., broadcast: _Optional[_Union[Broadcast, _Mapping]] = ..., disconnect_many: _Optional[_Union[DisconnectMany, _Mapping]] = ..., fenced: _Optional[_Union[Fenced, _Mapping]] = ...) -> None: ...

class Send(_message.Message):
    __slots__ = ("data", "type")
    class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DATA_TYPE_UNSPECIFIED: _ClassVar[Send.DataType]
        BINARY: _ClassVar[Send.DataType]
        TEXT: _ClassVar[Send.DataType]
    DATA_TYPE_UNSPECIFIED: Send.DataType
    BINARY: Send.DataType
    TEXT: Send.DataType
    DATA_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    type: Send.DataType
    def __init__(self, data: _Optional[bytes] = ..., type: _Optional[_Union[Send.DataType, str]] = ...) -> None: ...

class Disconnect(_message.Message):
    __slots__ = ("status_code", "reason")
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    status_code: int
    reason: str
    def __init__(self, status_code: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Broadcast(_message.Message):
    __slots__ = ("data", "type", "connection_ids")
    DATA_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_IDS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    type: Send.DataType
    connection_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, data: _Optional[bytes] = ..., type: _Optional[_Union[Send.DataType, str]] = ..., connection_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DisconnectMany(_message.Message):
    __slots__ = ("status_code", "reason", "connection_ids")
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_IDS_FIELD_NUMBER: _ClassVar[int]
    status_code: int
    reason: str
    connection_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, status_code: _Optional[int] = ..., reason: _Optional[str] = ..., connection_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Fenced(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CommandOutcome(_message.Message):
    __slots__ = ("schema_version", "command_id", "node_id", "node_incarnation", "completed_at", "status", "detail", "delivered", "gone", "gone_ids", "failed_ids", "unreached_ids")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[CommandOutcome.Status]
        DONE: _ClassVar[CommandOutcome.Status]
        CONNECTION_GONE: _ClassVar[CommandOutcome.Status]
        EXPIRED: _ClassVar[CommandOutcome.Status]
        FAILED: _ClassVar[CommandOutcome.Status]
    STATUS_UNSPECIFIED: CommandOutcome.Status
    DONE: CommandOutcome.Status
    CONNECTION_GONE: CommandOutcome.Status
    EXPIRED: CommandOutcome.Status
    FAILED: CommandOutcome.Status
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_AT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_FIELD_NUMBER: _ClassVar[int]
    GONE_FIELD_NUMBER: _ClassVar[int]
    GONE_IDS_FIELD_NUMBER: _ClassVar[int]
    FAILED_IDS_FIELD_NUMBER: _ClassVar[int]
    UNREACHED_IDS_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    command_id: str
    node_id: str
    node_incarnation: int
    completed_at: _timestamp_pb2.Timestamp
    status: CommandOutcome.Status
    detail: str
    delivered: int
    gone: int
    gone_ids: _containers.RepeatedScalarFieldContainer[str]
    failed_ids: _containers.RepeatedScalarFieldContainer[str]
    unreached_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, schema_version: _Optional[int] = ..., command_id: _Optional[str] = ..., node_id: _Optional[str] = ..., node_incarnation: _Optional[int] = ..., completed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., status: _Optional[_Union[CommandOutcome.Status, str]] = ..., detail: _Optional[str] = ..., delivered: _Optional[int] = ..., gone: _Optional[int] = ..., gone_ids: _Optional[_Iterable[str]] = ..., failed_ids: _Optional[_Iterable[str]] = ..., unreached_ids: _Optional[_Iterable[str]] = ...) -> None: ...
