"""HTTP request -> request message, response message -> JSON, driven by descriptors.

The JSON mapping is protobuf's own (`json_format`): proto JSON names, RFC 3339
timestamps, int64 as strings. On top of it the shim is strict where a silent
default would hurt (an unknown field such as `expireAt` is a 422, never a token
without expiry) and complete where clients want a stable shape (repeated fields
always present, an unset message field such as a timestamp rendered as null).
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from .errors import ApiError, unauthorized, validation_error
from .routes import Route, find_field, is_map, is_repeated, resolve_field_path

# Query-parameter names that carry credentials in other APIs. The shim never
# takes credentials from a URL (URLs end up in logs, proxies and browser
# history): such a parameter is refused with 401, even when a request field of
# that name exists, so a client that tried it learns at once. Compared after
# lower-casing and dropping '_' and '-'.
CREDENTIAL_QUERY_PARAMS = frozenset(
    {
        "accesstoken",
        "token",
        "apitoken",
        "apikey",
        "key",
        "authorization",
        "auth",
        "bearer",
        "idtoken",
        "refreshtoken",
        "secret",
        "clientsecret",
        "password",
    }
)

_JSON_TYPES = {
    FieldDescriptor.TYPE_STRING: "a string",
    FieldDescriptor.TYPE_BOOL: "true or false",
    FieldDescriptor.TYPE_BYTES: "a base64 string",
    FieldDescriptor.TYPE_DOUBLE: "a number",
    FieldDescriptor.TYPE_FLOAT: "a number",
    FieldDescriptor.TYPE_INT32: "a 32-bit integer",
    FieldDescriptor.TYPE_SINT32: "a 32-bit integer",
    FieldDescriptor.TYPE_SFIXED32: "a 32-bit integer",
    FieldDescriptor.TYPE_UINT32: "a non-negative 32-bit integer",
    FieldDescriptor.TYPE_FIXED32: "a non-negative 32-bit integer",
    FieldDescriptor.TYPE_INT64: "a 64-bit integer",
    FieldDescriptor.TYPE_SINT64: "a 64-bit integer",
    FieldDescriptor.TYPE_SFIXED64: "a 64-bit integer",
    FieldDescriptor.TYPE_UINT64: "a non-negative 64-bit integer",
    FieldDescriptor.TYPE_FIXED64: "a non-negative 64-bit integer",
}
_WKT_TYPES = {
    "google.protobuf.Timestamp": "an RFC 3339 timestamp such as 2026-12-31T23:59:59Z, or null",
    "google.protobuf.Duration": "a duration in seconds such as 1.5s",
    "google.protobuf.FieldMask": "a comma-separated list of field paths",
}


def expected_value(fd: FieldDescriptor, item: bool = False) -> str:
    """What a JSON value for fd must look like, in words, for error details."""
    if is_map(fd):
        return "an object"
    if is_repeated(fd) and not item:
        return f"an array whose items are each {expected_value(fd, item=True)}"
    if fd.type == FieldDescriptor.TYPE_ENUM:
        return "one of " + ", ".join(v.name for v in fd.enum_type.values)
    if fd.type in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_GROUP):
        return _WKT_TYPES.get(fd.message_type.full_name, "an object")
    return _JSON_TYPES.get(fd.type, "a valid value")


def _has_plain_json(desc: Descriptor) -> bool:
    """False for well-known types, whose JSON form is special (Timestamp, Struct, Any...)."""
    return not desc.full_name.startswith("google.protobuf.")


UNKNOWN_FIELD = "unknown field"


def _bad_keys(value: Any, desc: Descriptor, prefix: str) -> list[tuple[str, str]]:
    """Paths of JSON keys that name no field, or name a field another key named too
    (`expires_at` beside `expiresAt`: json_format would let the last one win
    silently), at any depth."""
    if not isinstance(value, dict) or not _has_plain_json(desc):
        return []
    found: list[tuple[str, str]] = []
    spelled: dict[int, str] = {}
    for key, item in value.items():
        fd = find_field(desc, key, json_names=True)
        if fd is None:
            found.append((prefix + key, UNKNOWN_FIELD))
            continue
        path = prefix + fd.json_name
        if fd.number in spelled:
            found.append(
                (path, f"given twice, as {spelled[fd.number]} and as {key}: send it once")
            )
            continue
        spelled[fd.number] = key
        if fd.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        if is_map(fd):
            value_fd = fd.message_type.fields_by_name["value"]
            if value_fd.type == FieldDescriptor.TYPE_MESSAGE and isinstance(item, dict):
                for k, v in item.items():
                    found += _bad_keys(v, value_fd.message_type, f"{path}[{k}].")
        elif is_repeated(fd):
            if isinstance(item, list):
                for i, element in enumerate(item):
                    found += _bad_keys(element, fd.message_type, f"{path}[{i}].")
        else:
            found += _bad_keys(item, fd.message_type, path + ".")
    return found


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity; 422 otherwise."""
    try:
        text = raw.decode("utf-8")
        return json.loads(
            text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant
        )
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise validation_error("The request body is not valid JSON.") from None


def _set_path(target: dict, fds: tuple[FieldDescriptor, ...], value: Any) -> None:
    """Sets value at a field path in a JSON dict, replacing either spelling of it."""
    for fd in fds[:-1]:
        child = target.pop(fd.name, None) if fd.name != fd.json_name else None
        child = target.get(fd.json_name, child)
        if not isinstance(child, dict):
            child = {}
        target[fd.json_name] = child
        target = child
    leaf = fds[-1]
    target.pop(leaf.name, None)
    target[leaf.json_name] = value


def _scalar_from_text(fd: FieldDescriptor, text: str) -> Any:
    """A path or query string as the JSON value json_format expects for fd."""
    if fd.type == FieldDescriptor.TYPE_BOOL:
        lowered = text.lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
        return text  # json_format rejects it, and the field is named in the error
    if fd.type == FieldDescriptor.TYPE_ENUM and text.lstrip("-").isdigit():
        return int(text)
    if fd.type == FieldDescriptor.TYPE_MESSAGE and fd.message_type.full_name == (
        "google.protobuf.BoolValue"
    ):
        return {"true": True, "false": False}.get(text.lower(), text)
    return text


def _json_path(fds: tuple[FieldDescriptor, ...]) -> str:
    return ".".join(fd.json_name for fd in fds)


def query_to_dict(route: Route, query: list[tuple[str, str]]) -> dict[str, Any]:
    """Query parameters as a JSON dict of the request message."""
    result: dict[str, Any] = {}
    seen: set[tuple[str, ...]] = set()
    for name, text in query:
        if name.lower().replace("_", "").replace("-", "") in CREDENTIAL_QUERY_PARAMS:
            raise unauthorized(
                "Credentials are never accepted in the query string; send them in the "
                "Authorization header."
            )
        fds = route.query_params.get(name)
        if fds is None:
            raise validation_error(
                "Unknown query parameter.", (name, "unknown query parameter")
            )
        key = tuple(fd.name for fd in fds)
        leaf = fds[-1]
        value = _scalar_from_text(leaf, text)
        if is_repeated(leaf):
            node = result
            for fd in fds[:-1]:
                node = node.setdefault(fd.json_name, {})
            node.setdefault(leaf.json_name, []).append(value)
        elif key in seen:
            raise validation_error(
                "A query parameter was given more than once.",
                (_json_path(fds), "must be given at most once"),
            )
        else:
            _set_path(result, fds, value)
        seen.add(key)
    return result


def _merge(target: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


def build_request(
    route: Route,
    path_values: dict[tuple[str, ...], str],
    query: list[tuple[str, str]],
    body: Any,
) -> Message:
    """The request message from the path, the query and the parsed JSON body.

    body is the parsed JSON (None when the route takes no body or none was sent).
    Path variables win over body fields, as in grpc-gateway.
    """
    desc = route.method.input_type
    data: dict[str, Any] = {}
    if route.body == "*":
        if body is not None and not isinstance(body, dict):
            raise validation_error("The request body must be a JSON object.")
        data = body or {}
    elif route.body and body is not None:
        _set_path(data, resolve_field_path(desc, route.body), body)
    if query:
        _merge(data, query_to_dict(route, query))
    _imply_update_mask(route, data, body)

    bad_keys = _bad_keys(data, desc, "")
    if bad_keys:
        message = (
            "The request names fields that do not exist."
            if all(why == UNKNOWN_FIELD for _, why in bad_keys)
            else "The request names a field twice, or fields that do not exist."
        )
        raise validation_error(message, *bad_keys)

    for path, text in path_values.items():
        fds = resolve_field_path(desc, path)
        _set_path(data, fds, _scalar_from_text(fds[-1], text))

    message = route.request_class()
    try:
        json_format.ParseDict(data, message)
    except (json_format.ParseError, ValueError, TypeError, RecursionError):
        raise validation_error(
            "The request has fields with invalid values.", *_bad_values(route, data)
        ) from None
    return message


def _imply_update_mask(route: Route, data: dict[str, Any], body: Any) -> None:
    """A PATCH whose body is one message field: without an update mask, the body's keys are it.

    What grpc-gateway does for AIP-134 updates: the caller sends the fields to
    change, and a field sent as null is a field to clear. Only the top-level
    keys count, so a nested message (a rate limit) is replaced whole. Keys
    naming no field are left for the unknown-field check to report.
    """
    if route.http_method != "PATCH" or not route.body or route.body == "*":
        return
    mask_fd = find_field(route.method.input_type, "update_mask")
    if (
        mask_fd is None
        or mask_fd.type != FieldDescriptor.TYPE_MESSAGE
        or mask_fd.message_type.full_name != "google.protobuf.FieldMask"
        or mask_fd.name in data
        or mask_fd.json_name in data
        or not isinstance(body, dict)
    ):
        return
    target = resolve_field_path(route.method.input_type, route.body)[-1].message_type
    paths = []
    for key in body:
        fd = find_field(target, key, json_names=True) if target is not None else None
        if fd is not None:
            paths.append(fd.json_name)
    data[mask_fd.json_name] = ",".join(paths)


def _bad_values(route: Route, data: dict[str, Any]) -> list[tuple[str, str]]:
    """Which fields failed to parse, each with what was expected: the innermost
    field of a nested message (`rateLimit.period`), not the message around it.

    A PATCH whose body is one message field names them as the caller sent them,
    at the top level of the body (as the server's own violations are named).
    """
    found = _bad_fields(route.method.input_type, data, "")
    if route.body and route.body != "*":
        prefix = _json_path(resolve_field_path(route.method.input_type, route.body)) + "."
        found = [(p.removeprefix(prefix), why) for p, why in found]
    return found or [("", "invalid request")]


def _bad_fields(desc: Descriptor, data: dict[str, Any], prefix: str) -> list[tuple[str, str]]:
    message_class = GetMessageClass(desc)
    found = []
    for key, value in data.items():
        try:
            json_format.ParseDict({key: value}, message_class())
            continue
        except Exception:
            pass
        fd = find_field(desc, key, json_names=True)
        if fd is None:
            found.append((prefix + key, "invalid value"))
            continue
        path = prefix + fd.json_name
        if (
            fd.type == FieldDescriptor.TYPE_MESSAGE
            and not is_map(fd)
            and not is_repeated(fd)
            and _has_plain_json(fd.message_type)
            and isinstance(value, dict)
        ):
            inner = _bad_fields(fd.message_type, value, path + ".")
            if inner:
                found += inner
                continue
        found.append((path, "must be " + expected_value(fd)))
    return found


def _null_fill(data: dict[str, Any], desc: Descriptor) -> None:
    """Adds null for every unset singular message field, recursively."""
    for fd in desc.fields:
        if fd.type != FieldDescriptor.TYPE_MESSAGE or is_map(fd):
            continue
        oneof = fd.containing_oneof
        if oneof is not None and len(oneof.fields) > 1:
            continue  # a real oneof: only the member that is set appears
        key = fd.json_name
        plain = _has_plain_json(fd.message_type)
        if is_repeated(fd):
            if plain:
                for item in data.get(key, []):
                    _null_fill(item, fd.message_type)
        elif key not in data:
            data[key] = None
        elif plain and isinstance(data[key], dict):
            _null_fill(data[key], fd.message_type)
    # Descriptor order, as a person reading the proto expects.
    ordered = {fd.json_name: data.pop(fd.json_name) for fd in desc.fields if fd.json_name in data}
    ordered.update(data)
    data.clear()
    data.update(ordered)


def render_response(route: Route, message: Message) -> Any:
    """The JSON value of a response message (or of its response_body field)."""
    data = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
    _null_fill(data, message.DESCRIPTOR)
    if route.response_body:
        value: Any = data
        for fd in resolve_field_path(message.DESCRIPTOR, route.response_body):
            value = value.get(fd.json_name) if isinstance(value, dict) else None
        return value
    return data


__all__ = ["ApiError", "build_request", "parse_json", "render_response"]
