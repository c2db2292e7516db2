"""The REST mapping's routes, read once from the .protos' `google.api.http` annotations (the one
description of them): ConnectionService's upstream routes and ConnectionDirectoryService's own.
An annotation this module cannot serve fails at import."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from google.api import annotations_pb2
from google.protobuf import descriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from conntrack.api.application.directory import DIRECTORY_SERVICE
from conntrack.api.application.service import SERVICE

_VARIABLE = re.compile(r"\{([^{}=]+)(=[^{}]*)?\}")


@dataclass(frozen=True, slots=True)
class Route:
    """One `google.api.http` rule of a ConnectionService or ConnectionDirectoryService method."""

    service: str  # the service's full name
    rpc: str  # the method's name: Get, Send, Disconnect, ListConnections, ...
    http_method: str  # GET, POST, DELETE
    path: str  # aiohttp's (and OpenAPI's) template: variables named by their JSON names
    path_fields: tuple[str, ...]  # the request fields the path sets (proto names)
    body: str  # the rule's body: "" (none) or "*" (the whole request)
    request_type: type[Message]
    response_type: type[Message]

    @property
    def full_method(self) -> str:
        return f"/{self.service}/{self.rpc}"

    @property
    def query_fields(self) -> tuple[Any, ...]:
        """The request's fields a GET or DELETE takes from the query string: those not in the
        path (with a body "*" every other field is in the body)."""
        if self.body == "*":
            return ()
        fields = self.request_type.DESCRIPTOR.fields
        return tuple(f for f in fields if f.name not in self.path_fields)

    @property
    def path_suffix(self) -> str:
        """What the template has after its last variable (":send"), matched literally."""
        return _VARIABLE.split(self.path)[-1] if _VARIABLE.search(self.path) else ""


def _route(method: descriptor.MethodDescriptor) -> Route:
    rule = method.GetOptions().Extensions[annotations_pb2.http]
    kind = rule.WhichOneof("pattern")
    if kind is None or kind == "custom":
        raise ValueError(f"{method.full_name}: no google.api.http route this mapping serves")
    template: str = getattr(rule, kind)
    request = method.input_type
    fields: list[str] = []

    def json_variable(match: re.Match[str]) -> str:
        name, pattern = match.group(1), match.group(2)
        field = request.fields_by_name.get(name)
        # Only {field} of a top-level string field: all upstream uses, and all this serves.
        if pattern or field is None or field.type != descriptor.FieldDescriptor.TYPE_STRING:
            raise ValueError(f"{method.full_name}: unsupported path variable {match.group(0)}")
        fields.append(name)
        return "{" + field.json_name + "}"

    path = _VARIABLE.sub(json_variable, template)
    if rule.body not in ("", "*") or rule.additional_bindings:
        raise ValueError(f"{method.full_name}: unsupported google.api.http body or bindings")
    return Route(
        service=method.containing_service.full_name,
        rpc=method.name,
        http_method=kind.upper(),
        path=path,
        path_fields=tuple(fields),
        body=rule.body,
        request_type=GetMessageClass(request),
        response_type=GetMessageClass(method.output_type),
    )


# Read once from the descriptors: an annotation this module cannot serve fails at import.
ROUTES: Final = tuple(_route(m) for s in (SERVICE, DIRECTORY_SERVICE) for m in s.methods)
