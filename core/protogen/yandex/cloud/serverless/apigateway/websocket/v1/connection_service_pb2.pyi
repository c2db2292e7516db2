from google.api import annotations_pb2 as _annotations_pb2
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import connection_pb2 as _connection_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetConnectionRequest(_message.Message):
    __slots__ = ("connection_id",)
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    connection_id: str
    def __init__(self, connection_id: _Optional[str] = ...) -> None: ...

class DisconnectRequest(_message.Message):
    __slots__ = ("connection_id",)
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    connection_id: str
    def __init__(self, connection_id: _Optional[str] = ...) -> None: ...

class SendToConnectionRequest(_message.Message):
    __slots__ = ("connection_id", "data", "type")
    class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DATA_TYPE_UNSPECIFIED: _ClassVar[SendToConnectionRequest.DataType]
        BINARY: _ClassVar[SendToConnectionRequest.DataType]
        TEXT: _ClassVar[SendToConnectionRequest.DataType]
    DATA_TYPE_UNSPECIFIED: SendToConnectionRequest.DataType
    BINARY: SendToConnectionRequest.DataType
    TEXT: SendToConnectionRequest.DataType
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    connection_id: str
    data: bytes
    type: SendToConnectionRequest.DataType
    def __init__(self, connection_id: _Optional[str] = ..., data: _Optional[bytes] = ..., type: _Optional[_Union[SendToConnectionRequest.DataType, str]] = ...) -> None: ...

class SendToConnectionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DisconnectResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
