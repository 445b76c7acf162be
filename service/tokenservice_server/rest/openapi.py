"""The OpenAPI 3.1 document, generated from the same routes and message descriptors.

Schemas come in two flavours per message, because the shim's JSON is not
symmetric: a response always carries every field (repeated ones as arrays,
unset messages and timestamps as null), so the output schema lists them all as
required; a request may leave any field out, so the input schema (`...Input`)
requires nothing. Both forbid unknown properties, as the shim does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from .. import __version__
from ..policy import Caller, caller_for
from .headers import RESPONSE_HEADER_DOCS
from .routes import Route, is_map, is_repeated, is_scalar_like, resolve_field_path
from .transcode import CREDENTIAL_QUERY_PARAMS

ERROR_CODES = [
    "validation_error",
    "unauthorized",
    "forbidden",
    "not_found",
    "conflict",
    "method_not_allowed",
    "rate_limited",
    "unavailable",
    "internal_error",
]

# HTTP status -> description, for the error responses every operation documents.
_ERROR_RESPONSES = {
    "401": "Missing or invalid credentials, or credentials sent in the query string.",
    "403": "The caller lacks a required permission.",
    "404": "No such resource, or one outside the caller's reach.",
    "409": "The token's state forbids this change (revoked, expired or already rotated).",
    "422": "Invalid request: malformed JSON, an unknown or invalid field.",
    "429": "Too many failed attempts, or the token is over its rate limit; retry after "
           "the Retry-After delay.",
    "500": "An internal error.",
    "503": "The service is unavailable.",
}
_BODY_ERROR_RESPONSES = {
    "413": "The request body is larger than 64 KiB.",
    "415": "The request body is not application/json.",
}

_INT32 = {"type": "integer", "format": "int32", "minimum": -(2**31), "maximum": 2**31 - 1}
_UINT32 = {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**32 - 1}
_INT64 = {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"}
_UINT64 = {"type": "string", "format": "uint64", "pattern": "^[0-9]+$"}
_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
    FieldDescriptor.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldDescriptor.TYPE_INT32: _INT32,
    FieldDescriptor.TYPE_SINT32: _INT32,
    FieldDescriptor.TYPE_SFIXED32: _INT32,
    FieldDescriptor.TYPE_UINT32: _UINT32,
    FieldDescriptor.TYPE_FIXED32: _UINT32,
    FieldDescriptor.TYPE_INT64: _INT64,
    FieldDescriptor.TYPE_SINT64: _INT64,
    FieldDescriptor.TYPE_SFIXED64: _INT64,
    FieldDescriptor.TYPE_UINT64: _UINT64,
    FieldDescriptor.TYPE_FIXED64: _UINT64,
}
_WRAPPERS = {
    "google.protobuf.StringValue": FieldDescriptor.TYPE_STRING,
    "google.protobuf.BytesValue": FieldDescriptor.TYPE_BYTES,
    "google.protobuf.BoolValue": FieldDescriptor.TYPE_BOOL,
    "google.protobuf.Int32Value": FieldDescriptor.TYPE_INT32,
    "google.protobuf.UInt32Value": FieldDescriptor.TYPE_UINT32,
    "google.protobuf.Int64Value": FieldDescriptor.TYPE_INT64,
    "google.protobuf.UInt64Value": FieldDescriptor.TYPE_UINT64,
    "google.protobuf.FloatValue": FieldDescriptor.TYPE_FLOAT,
    "google.protobuf.DoubleValue": FieldDescriptor.TYPE_DOUBLE,
}
_WKT: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$"},
    "google.protobuf.FieldMask": {"type": "string"},
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array"},
    "google.protobuf.Empty": {"type": "object", "additionalProperties": False},
    "google.protobuf.Any": {"type": "object", "required": ["@type"]},
}

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "details"],
            "additionalProperties": False,
            "properties": {
                "code": {"type": "string", "enum": ERROR_CODES},
                "message": {"type": "string"},
                "details": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["field", "description"],
                        "additionalProperties": False,
                        "properties": {
                            "field": {"type": "string"},
                            "description": {"type": "string"},
                        },
                    },
                },
            },
        }
    },
}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    if schema.get("type") and isinstance(schema["type"], str) and "$ref" not in schema:
        return {**schema, "type": [schema["type"], "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def _in_real_oneof(fd: FieldDescriptor) -> bool:
    oneof = fd.containing_oneof
    return oneof is not None and len(oneof.fields) > 1


class _Schemas:
    """Builds component schemas for messages on demand."""

    def __init__(self) -> None:
        self.components: dict[str, Any] = {"Error": ERROR_SCHEMA}
        self._names: dict[tuple[str, bool], str] = {}

    def ref(self, desc: Descriptor, output: bool) -> dict[str, Any]:
        key = (desc.full_name, output)
        if key not in self._names:
            base = desc.name if output else desc.name + "Input"
            name = base
            if name in self.components:
                name = desc.full_name.replace(".", "_") + ("" if output else "Input")
            self._names[key] = name
            self.components[name] = {}  # placeholder: recursion stops here
            self.components[name] = self.message(desc, output)
        return {"$ref": f"#/components/schemas/{self._names[key]}"}

    def message(
        self, desc: Descriptor, output: bool, exclude: Iterable[str] = ()
    ) -> dict[str, Any]:
        excluded = set(exclude)
        properties = {}
        required = []
        for fd in desc.fields:
            if fd.name in excluded:
                continue
            properties[fd.json_name] = self.field(fd, output)
            optional_scalar = fd.has_presence and fd.type != FieldDescriptor.TYPE_MESSAGE
            if output and not optional_scalar and not _in_real_oneof(fd):
                required.append(fd.json_name)
        schema: dict[str, Any] = {
            "type": "object",
            "title": desc.full_name,
            "properties": properties,
            "additionalProperties": False,
        }
        if required:
            schema["required"] = required
        return schema

    def value(self, fd: FieldDescriptor, output: bool) -> dict[str, Any]:
        """The schema of one value of fd (one item, for a repeated field)."""
        if fd.type == FieldDescriptor.TYPE_ENUM:
            return {"type": "string", "enum": [v.name for v in fd.enum_type.values]}
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            name = fd.message_type.full_name
            if name in _WRAPPERS:
                return dict(_SCALARS[_WRAPPERS[name]])
            if name in _WKT:
                return dict(_WKT[name])
            return self.ref(fd.message_type, output)
        return dict(_SCALARS.get(fd.type, {}))

    def field(self, fd: FieldDescriptor, output: bool) -> dict[str, Any]:
        if is_map(fd):
            value_fd = fd.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self.value(value_fd, output)}
        if is_repeated(fd):
            return {"type": "array", "items": self.value(fd, output)}
        schema = self.value(fd, output)
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            return _nullable(schema)
        return schema


def _error_response(description: str, retry_after: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if retry_after:
        response["headers"] = {
            "Retry-After": {
                "description": "Seconds to wait before retrying.",
                "schema": {"type": "integer", "minimum": 0},
            }
        }
    return response


def _parameters(route: Route, schemas: _Schemas) -> list[dict[str, Any]]:
    params = []
    for var in route.template.variables:
        fds = resolve_field_path(route.method.input_type, var.field_path)
        params.append(
            {
                "name": var.openapi_name,
                "in": "path",
                "required": True,
                "schema": schemas.value(fds[-1], output=False),
            }
        )
    for name, fds in route.query_params.items():
        if name != ".".join(fd.json_name for fd in fds):
            continue  # the snake_case spelling is accepted but documented once
        if name.lower().replace("_", "").replace("-", "") in CREDENTIAL_QUERY_PARAMS:
            continue  # refused by the shim: never from a URL
        param: dict[str, Any] = {
            "name": name,
            "in": "query",
            "required": False,
            "schema": schemas.field(fds[-1], output=False),
        }
        if is_repeated(fds[-1]):
            param.update(style="form", explode=True)
        params.append(param)
    return params


def _operation(route: Route, schemas: _Schemas) -> dict[str, Any]:
    suffix = "" if route.binding_index == 0 else str(route.binding_index + 1)
    op: dict[str, Any] = {
        "operationId": route.method.name + suffix,
        "summary": route.method.name,
        "description": f"Transcoded to the gRPC method `{route.rpc_path}`.",
        "tags": [route.method.containing_service.name],
        "parameters": _parameters(route, schemas),
    }
    if caller_for(route.method.full_name) is Caller.ANONYMOUS:
        # Documentation only: the shim forwards an Authorization header whenever one
        # is sent. An RPC the policy table does not name keeps the document's default,
        # a bearer token.
        op["security"] = [{}, {"bearerAuth": []}]
    if route.body:
        if route.body == "*":
            path_fields = route.path_fields
            if path_fields:
                body_schema = schemas.message(route.method.input_type, False, path_fields)
            else:
                body_schema = schemas.ref(route.method.input_type, output=False)
        else:
            fds = resolve_field_path(route.method.input_type, route.body)
            body_schema = schemas.field(fds[-1], output=False)
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": body_schema}},
        }
    if route.response_body:
        fds = resolve_field_path(route.method.output_type, route.response_body)
        response_schema = schemas.field(fds[-1], output=True)
    else:
        response_schema = schemas.ref(route.method.output_type, output=True)
    responses: dict[str, Any] = {
        str(route.success_status): {
            "description": "Success.",
            "headers": {
                "Cache-Control": {"schema": {"type": "string", "const": "no-store"}},
                **RESPONSE_HEADER_DOCS.get(route.method.output_type.full_name, {}),
            },
            "content": {"application/json": {"schema": response_schema}},
        }
    }
    errors = dict(_ERROR_RESPONSES)
    if route.body:
        errors.update(_BODY_ERROR_RESPONSES)
    for status in sorted(errors):
        responses[status] = _error_response(errors[status], retry_after=status == "429")
    op["responses"] = responses
    return op


def build_openapi(routes: Iterable[Route], title: str = "tokenservice") -> dict[str, Any]:
    """The OpenAPI 3.1 document for routes, plus /healthz and /openapi.json."""
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.template.openapi_path, {})[route.http_method.lower()] = _operation(
            route, schemas
        )
    paths["/healthz"] = {
        "get": {
            "operationId": "Healthz",
            "summary": "Health",
            "description": "200 while the gRPC server reports SERVING (its database answers).",
            "security": [{}],
            "responses": {
                "200": {
                    "description": "Serving.",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["status"],
                                "properties": {"status": {"type": "string", "const": "SERVING"}},
                            }
                        }
                    },
                },
                "503": _error_response("Not serving."),
            },
        }
    }
    paths["/openapi.json"] = {
        "get": {
            "operationId": "OpenApi",
            "summary": "This document",
            "security": [{}],
            "responses": {
                "200": {
                    "description": "The OpenAPI document.",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": __version__,
            "description": "The REST/JSON face of the gRPC API, generated from its "
            "google.api.http annotations. Errors: "
            '{"error": {"code", "message", "details": [{"field", "description"}]}}.',
        },
        "paths": paths,
        "components": {
            "schemas": schemas.components,
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API token: `Authorization: Bearer <token>`.",
                }
            },
        },
        "security": [{"bearerAuth": []}],
    }


__all__ = ["build_openapi", "is_scalar_like"]
