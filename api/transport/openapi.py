"""The OpenAPI 3.1 document of the REST mapping (api/transport/rest.py), made from the same route
table the server registers (rest_routes.ROUTES, read from the .proto's google.api.http
annotations) and the messages' descriptors, so it describes exactly what is served.
`GET /openapi.json` serves it."""

from __future__ import annotations

from typing import Any, Final

from google.protobuf import descriptor

from conntrack.api.application.freshness import POSITION_AGE_HEADER, POSITION_HEADER
from conntrack.api.transport import rest
from conntrack.api.transport.rest_routes import ROUTES, Route
from conntrack.core.commands import MAX_SEND_BYTES
from conntrack.core.ids import UPSTREAM_CONNECTION_ID_LENGTH

FD = descriptor.FieldDescriptor
STATUS_SCHEMA: Final = "Status"
_STATUS_REF: Final = f"#/components/schemas/{STATUS_SCHEMA}"

# What upstream's validation options say of the fields (api/application/validation.py enforces
# them).
_FIELD_LIMITS: Final[dict[str, dict[str, Any]]] = {
    "connection_id": {"minLength": 1, "maxLength": UPSTREAM_CONNECTION_ID_LENGTH},
}
_BYTES_LIMITS: Final[dict[str, dict[str, Any]]] = {
    "data": {"description": f"Base64 of 1 to {MAX_SEND_BYTES} bytes (a TEXT frame's: UTF-8)."},
}

_SCALARS: Final[dict[int, dict[str, Any]]] = {
    FD.TYPE_STRING: {"type": "string"},
    FD.TYPE_BYTES: {"type": "string", "format": "byte"},
    FD.TYPE_BOOL: {"type": "boolean"},
    FD.TYPE_INT32: {"type": "integer", "format": "int32"},
    FD.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FD.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FD.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0},
    FD.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0},
    # proto3 JSON writes 64-bit integers as strings.
    FD.TYPE_INT64: {"type": "string", "format": "int64"},
    FD.TYPE_SINT64: {"type": "string", "format": "int64"},
    FD.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    FD.TYPE_UINT64: {"type": "string", "format": "uint64"},
    FD.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    FD.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FD.TYPE_FLOAT: {"type": "number", "format": "float"},
}
# Well-known types with a JSON form of their own.
_WELL_KNOWN: Final[dict[str, dict[str, Any]]] = {
    "google.protobuf.Timestamp": {
        "type": "string",
        "format": "date-time",
        "description": "RFC 3339, UTC, with up to nanoseconds.",
    },
}


class _Schemas:
    """Component schemas of the messages reached, keyed by their short names."""

    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def ref(self, message: Any, omit: tuple[str, ...] = ()) -> dict[str, Any]:
        if message.full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[message.full_name])
        name = message.name if not omit else f"{message.name}Body"
        if name not in self.components:
            self.components[name] = {}  # placeholder: a message may refer to itself
            self.components[name] = self._object(message, omit)
        return {"$ref": f"#/components/schemas/{name}"}

    def _object(self, message: Any, omit: tuple[str, ...]) -> dict[str, Any]:
        properties = {
            field.json_name: self.field(field) for field in message.fields if field.name not in omit
        }
        return {"type": "object", "properties": properties, "additionalProperties": False}

    def field(self, field: Any) -> dict[str, Any]:
        schema: dict[str, Any]
        if field.message_type is not None:
            schema = self.ref(field.message_type)
        elif field.enum_type is not None:
            schema = {"type": "string", "enum": [v.name for v in field.enum_type.values]}
        else:
            schema = dict(_SCALARS[field.type])
            schema.update(_FIELD_LIMITS.get(field.name, {}))
            if field.type == FD.TYPE_BYTES:
                schema.update(_BYTES_LIMITS.get(field.name, {}))
        if field.is_repeated:
            return {"type": "array", "items": schema}
        return schema


def _operation(route: Route, schemas: _Schemas, secured: bool) -> dict[str, Any]:
    request = route.request_type.DESCRIPTOR
    parameters = []
    for name in route.path_fields:
        field = request.fields_by_name[name]
        parameters.append(
            {
                "name": field.json_name,
                "in": "path",
                "required": True,
                "description": f"{name} (percent-encoded).",
                "schema": schemas.field(field),
            }
        )
    parameters.extend(_query_parameters(route.query_fields, "", schemas))
    parameters.append(
        {
            "name": "grpc-timeout",
            "in": "header",
            "required": False,
            "description": "The call's deadline, as gRPC writes it (e.g. 5S, 1500m).",
            "schema": {"type": "string", "pattern": "^[0-9]{1,8}[HMSmun]$"},
        }
    )
    freshness = {
        header: {"schema": {"type": "string"}, "description": description}
        for header, description in (
            (POSITION_HEADER, "The projection's position the answer reflects at least."),
            (POSITION_AGE_HEADER, "How old that reading of the position is (ms)."),
        )
    }
    operation: dict[str, Any] = {
        "operationId": f"{route.service.rsplit('.', 1)[-1]}_{route.rpc}",
        "summary": f"{route.service}.{route.rpc}",
        "parameters": parameters,
        "responses": {
            "200": {
                "description": "OK",
                "headers": freshness,
                "content": {
                    "application/json": {"schema": schemas.ref(route.response_type.DESCRIPTOR)}
                },
            },
            "default": {
                "description": "An error: the gRPC status code and message (docs/api.md).",
                "content": {
                    "application/json": {
                        "schema": {"$ref": f"#/components/schemas/{STATUS_SCHEMA}"}
                    }
                },
            },
        },
    }
    if route.body == "*":
        operation["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": schemas.ref(request, omit=route.path_fields)}
            },
        }
    if secured:
        operation["security"] = [{"bearer": []}]
    return operation


def _query_parameters(fields: Any, prefix: str, schemas: _Schemas) -> list[dict[str, Any]]:
    """A GET's query parameters: each single-valued field, messages' fields dotted (JSON
    names), as rest_requests reads them."""
    parameters: list[dict[str, Any]] = []
    for field in fields:
        name = prefix + field.json_name
        if field.message_type is not None and field.message_type.full_name not in _WELL_KNOWN:
            parameters.extend(_query_parameters(field.message_type.fields, name + ".", schemas))
        elif not field.is_repeated:
            parameters.append(
                {"name": name, "in": "query", "required": False, "schema": schemas.field(field)}
            )
    return parameters


def document(*, secured: bool) -> dict[str, Any]:
    """The document of every route rest.build_app registers; `secured` when the server
    requires bearer tokens."""
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.http_method.lower()] = _operation(
            route, schemas, secured
        )
    paths[rest.OPENAPI_PATH] = {
        "get": {
            "operationId": "openapi",
            "summary": "This document.",
            "responses": {
                "200": {
                    "description": "OpenAPI 3.1",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        }
    }
    components: dict[str, Any] = {
        "schemas": {
            **schemas.components,
            STATUS_SCHEMA: {
                "type": "object",
                "properties": {
                    "code": {"type": "integer", "description": "gRPC status code."},
                    "message": {"type": "string"},
                    "details": {"type": "array", "items": {"type": "object"}},
                },
                "required": ["code", "message", "details"],
            },
        }
    }
    if secured:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ConnectionService and ConnectionDirectoryService REST mapping",
            "version": "v1",
            "description": "Yandex Cloud API Gateway WebSocket ConnectionService over "
            "HTTP/JSON (upstream's google.api.http routes), and the project's connection "
            "directory (list, count, broadcast); see docs/api.md.",
        },
        "paths": paths,
        "components": components,
    }
