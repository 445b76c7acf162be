"""HTTP routes derived from the `google.api.http` rules on service descriptors.

Nothing here names an RPC of ours: every annotated method of every service
handed to `build_routes` gets its routes (the primary binding and each
`additional_bindings` entry), so adding an annotated RPC needs no change here.
The path-template grammar and the body/path/query split follow the HttpRule
semantics that grpc-gateway and Envoy's transcoder implement:

    Template = "/" Segments [ Verb ] ;
    Segments = Segment { "/" Segment } ;
    Segment  = "*" | "**" | LITERAL | Variable ;
    Variable = "{" FieldPath [ "=" Segments ] "}" ;
    Verb     = ":" LITERAL ;
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote

from google.api import annotations_pb2, http_pb2
from google.protobuf.descriptor import (
    Descriptor,
    FieldDescriptor,
    MethodDescriptor,
    ServiceDescriptor,
)
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

# The success status of a route is declared here, once: AIP-133 standard Create
# methods (a POST to a method named Create*) answer 201 Created, everything else
# 200. An RPC that needs something else gets an entry in this table, keyed by the
# method's full name.
SUCCESS_STATUS_OVERRIDES: dict[str, int] = {}


def success_status_for(method: MethodDescriptor, http_method: str) -> int:
    """The HTTP status a route answers with when its RPC succeeds."""
    override = SUCCESS_STATUS_OVERRIDES.get(method.full_name)
    if override is not None:
        return override
    if http_method == "POST" and method.name.startswith("Create"):
        return 201
    return 200


# Query parameters are bound only to leaf fields at most this many messages deep.
_MAX_QUERY_DEPTH = 4

# Well-known types whose JSON form is a single string or scalar, so they can be
# bound from one path segment or query parameter.
SCALAR_WKT = frozenset(
    {
        "google.protobuf.Timestamp",
        "google.protobuf.Duration",
        "google.protobuf.FieldMask",
        "google.protobuf.StringValue",
        "google.protobuf.BytesValue",
        "google.protobuf.BoolValue",
        "google.protobuf.Int32Value",
        "google.protobuf.Int64Value",
        "google.protobuf.UInt32Value",
        "google.protobuf.UInt64Value",
        "google.protobuf.FloatValue",
        "google.protobuf.DoubleValue",
    }
)


def is_scalar_like(fd: FieldDescriptor) -> bool:
    """True for fields whose JSON value is a scalar (including scalar well-known types)."""
    if fd.type != FieldDescriptor.TYPE_MESSAGE:
        return True
    return fd.message_type.full_name in SCALAR_WKT


def is_repeated(fd: FieldDescriptor) -> bool:
    return fd.is_repeated


def is_map(fd: FieldDescriptor) -> bool:
    return (
        fd.type == FieldDescriptor.TYPE_MESSAGE
        and fd.message_type.GetOptions().map_entry
        and is_repeated(fd)
    )


@dataclass(frozen=True)
class Variable:
    """One `{field.path}` or `{field.path=pattern}` of a template."""

    field_path: tuple[str, ...]
    group: str
    # The parameter's name in OpenAPI: the field's own name where the template
    # has no other variable of that name (`{api_token.id}` is `{id}`), so two
    # templates of one URL shape document as one path, as OpenAPI requires.
    openapi_name: str = ""


@dataclass(frozen=True)
class PathTemplate:
    """A parsed, compiled HttpRule path template."""

    template: str
    regex: re.Pattern[str]
    variables: tuple[Variable, ...]
    openapi_path: str

    def match(self, raw_path: str) -> dict[tuple[str, ...], str] | None:
        """The percent-decoded variable values if raw_path (still encoded) matches."""
        m = self.regex.fullmatch(raw_path)
        if m is None:
            return None
        return {v.field_path: unquote(m.group(v.group)) for v in self.variables}


def _split_segments(text: str) -> list[str]:
    segments, depth, current = [], 0, []
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "/" and depth == 0:
            segments.append("".join(current))
            current = []
        else:
            current.append(ch)
    segments.append("".join(current))
    return segments


def _segment_regex(segment: str) -> str:
    if segment == "*":
        return "[^/]+"
    if segment == "**":
        return ".+"
    if not segment or any(c in segment for c in "{}*"):
        raise ValueError(f"invalid path segment {segment!r}")
    return re.escape(segment)


def parse_template(template: str) -> PathTemplate:
    """Parses and compiles one HttpRule path template; raises ValueError if malformed."""
    if not template.startswith("/"):
        raise ValueError(f"path template {template!r} must start with '/'")
    body = template[1:]
    verb = ""
    colon = body.rfind(":")
    if colon != -1 and "/" not in body[colon:] and "}" not in body[colon:]:
        verb, body = body[colon + 1 :], body[:colon]
    parts: list[str] = []
    openapi: list[str] = []
    variables: list[Variable] = []
    for segment in _split_segments(body):
        if segment.startswith("{") and segment.endswith("}"):
            inner = segment[1:-1]
            name, _, pattern = inner.partition("=")
            path = tuple(name.split("."))
            if not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in path):
                raise ValueError(f"invalid variable {segment!r} in {template!r}")
            group = f"v{len(variables)}"
            sub = "/".join(_segment_regex(s) for s in _split_segments(pattern or "*"))
            parts.append(f"(?P<{group}>{sub})")
            openapi.append("\0" + group)  # named below, once every variable is known
            variables.append(Variable(path, group))
        else:
            parts.append(_segment_regex(segment))
            openapi.append(segment)
    regex = "/" + "/".join(parts) + (":" + re.escape(verb) if verb else "")
    leaves = [v.field_path[-1] for v in variables]
    variables = [
        Variable(
            v.field_path, v.group,
            v.field_path[-1] if leaves.count(v.field_path[-1]) == 1 else ".".join(v.field_path),
        )
        for v in variables
    ]
    names = {"\0" + v.group: "{" + v.openapi_name + "}" for v in variables}
    openapi = [names.get(segment, segment) for segment in openapi]
    openapi_path = "/" + "/".join(openapi) + (":" + verb if verb else "")
    return PathTemplate(template, re.compile(regex), tuple(variables), openapi_path)


@functools.cache
def _fields_by_any_name(message: Descriptor) -> dict[str, FieldDescriptor]:
    names = {fd.json_name: fd for fd in message.fields}
    names.update({fd.name: fd for fd in message.fields})  # a proto name wins a clash
    return names


def find_field(
    message: Descriptor, name: str, *, json_names: bool = False
) -> FieldDescriptor | None:
    """The field of message called name (or, with json_names, spelled so in JSON)."""
    if json_names:
        return _fields_by_any_name(message).get(name)
    return message.fields_by_name.get(name)


def resolve_prefix(
    message: Descriptor | None, path: Sequence[str], *, json_names: bool = False
) -> tuple[FieldDescriptor, ...]:
    """The field descriptors along path, as far as it resolves from message.

    The one field-path walker of the shim: routes, transcoding, OpenAPI and error
    details all resolve paths here, so they cannot disagree about what a path names.
    """
    fields: list[FieldDescriptor] = []
    current = message
    for name in path:
        fd = find_field(current, name, json_names=json_names) if current is not None else None
        if fd is None:
            break
        fields.append(fd)
        current = fd.message_type  # None for a scalar: nothing resolves below it
    return tuple(fields)


def resolve_field_path(
    message: Descriptor, path: str | Sequence[str]
) -> tuple[FieldDescriptor, ...]:
    """The field descriptors along a proto field path, dotted or split; ValueError if
    any field is missing (a bad annotation fails at start-up, not on a request)."""
    names = path.split(".") if isinstance(path, str) else tuple(path)
    fields = resolve_prefix(message, names)
    if len(fields) != len(names):
        raise ValueError(f"no field {'.'.join(names)!r} in {message.full_name}")
    return fields


@dataclass(frozen=True)
class Route:
    """One HTTP binding of one RPC."""

    http_method: str
    template: PathTemplate
    method: MethodDescriptor
    rpc_path: str
    body: str
    response_body: str
    success_status: int
    request_class: type[Message]
    response_class: type[Message]
    binding_index: int
    # Accepted query-parameter names (JSON and proto spellings, dotted for nested
    # fields) mapped to the field path they set.
    query_params: dict[str, tuple[FieldDescriptor, ...]] = field(default_factory=dict)

    @property
    def path_fields(self) -> frozenset[str]:
        """Top-level request fields bound by the path."""
        return frozenset(v.field_path[0] for v in self.template.variables)


def _query_params(
    message: Descriptor, exclude: frozenset[str]
) -> dict[str, tuple[FieldDescriptor, ...]]:
    params: dict[str, tuple[FieldDescriptor, ...]] = {}

    def walk(desc: Descriptor, json_prefix: str, proto_prefix: str, chain: tuple, depth: int):
        for fd in desc.fields:
            if not chain and fd.name in exclude:
                continue
            path = (*chain, fd)
            if is_map(fd):
                continue
            if is_scalar_like(fd):
                params[json_prefix + fd.json_name] = path
                params[proto_prefix + fd.name] = path
            elif not is_repeated(fd) and depth < _MAX_QUERY_DEPTH:
                walk(
                    fd.message_type,
                    json_prefix + fd.json_name + ".",
                    proto_prefix + fd.name + ".",
                    path,
                    depth + 1,
                )

    walk(message, "", "", (), 0)
    return params


def _bindings(rule: http_pb2.HttpRule) -> Iterable[http_pb2.HttpRule]:
    yield rule
    # Per the HttpRule spec, additional bindings do not nest.
    yield from rule.additional_bindings


def _method_and_path(rule: http_pb2.HttpRule) -> tuple[str, str]:
    kind = rule.WhichOneof("pattern")
    if kind is None:
        raise ValueError("HttpRule without a pattern")
    if kind == "custom":
        return rule.custom.kind.upper(), rule.custom.path
    return kind.upper(), getattr(rule, kind)


def build_routes(services: Iterable[ServiceDescriptor]) -> list[Route]:
    """Every HTTP route of every annotated method; raises ValueError on a bad rule."""
    routes: list[Route] = []
    for service in services:
        for method in service.methods:
            if method.client_streaming or method.server_streaming:
                continue  # only unary RPCs have a REST face
            options = method.GetOptions()
            if not options.HasExtension(annotations_pb2.http):
                continue
            rule = options.Extensions[annotations_pb2.http]
            request_class = GetMessageClass(method.input_type)
            response_class = GetMessageClass(method.output_type)
            for index, binding in enumerate(_bindings(rule)):
                http_method, path = _method_and_path(binding)
                template = parse_template(path)
                for var in template.variables:
                    fds = resolve_field_path(method.input_type, var.field_path)
                    if is_repeated(fds[-1]) or not is_scalar_like(fds[-1]):
                        raise ValueError(f"{method.full_name}: path variable must be a scalar")
                body = binding.body
                if body and body != "*":
                    resolve_field_path(method.input_type, body)
                if binding.response_body:
                    resolve_field_path(method.output_type, binding.response_body)
                path_fields = frozenset(v.field_path[0] for v in template.variables)
                if body == "*":
                    query: dict[str, tuple[FieldDescriptor, ...]] = {}
                else:
                    exclude = path_fields | ({body.split(".")[0]} if body else set())
                    query = _query_params(method.input_type, frozenset(exclude))
                routes.append(
                    Route(
                        http_method=http_method,
                        template=template,
                        method=method,
                        rpc_path=f"/{service.full_name}/{method.name}",
                        body=body,
                        response_body=binding.response_body,
                        success_status=success_status_for(method, http_method),
                        request_class=request_class,
                        response_class=response_class,
                        binding_index=index,
                        query_params=query,
                    )
                )
    return routes
