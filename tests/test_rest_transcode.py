"""The shim's generic parts on a service it has never seen: routes, transcoding, errors.

The demo service is built here as a descriptor with google.api.http rules, so
these tests prove that an annotated RPC gets its REST face with no shim change:
path variables (nested, multi-segment, custom verb), single-field bodies,
response_body, query parameters in both spellings, repeated parameters.
"""

from __future__ import annotations

import grpc
import pytest
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, duration_pb2, timestamp_pb2
from google.rpc import error_details_pb2, status_pb2

from tokenservice.v1 import token_service_pb2 as pb
from tokenservice_server.rest.errors import ApiError, from_rpc_error, json_field_path
from tokenservice_server.rest.openapi import build_openapi
from tokenservice_server.rest.routes import Route, build_routes, parse_template
from tokenservice_server.rest.transcode import build_request, parse_json, render_response

F = descriptor_pb2.FieldDescriptorProto


def _field(msg, name: str, number: int, kind: int, type_name: str = "", repeated=False):
    fd = msg.field.add(name=name, number=number, type=kind)
    if type_name:
        fd.type_name = type_name
    fd.label = F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL


def _demo_service():
    file = descriptor_pb2.FileDescriptorProto(
        name="restdemo/v1/demo.proto", package="restdemo.v1", syntax="proto3",
        dependency=["google/api/annotations.proto", "google/protobuf/timestamp.proto"],
    )
    kind = file.enum_type.add(name="Kind")
    kind.value.add(name="KIND_UNSPECIFIED", number=0)
    kind.value.add(name="BIG", number=1)
    inner = file.message_type.add(name="Inner")
    _field(inner, "count", 1, F.TYPE_INT64)
    _field(inner, "flag", 2, F.TYPE_BOOL)
    _field(inner, "kind", 3, F.TYPE_ENUM, ".restdemo.v1.Kind")
    shelf = file.message_type.add(name="Shelf")
    _field(shelf, "id", 1, F.TYPE_STRING)
    _field(shelf, "title", 2, F.TYPE_STRING)
    _field(shelf, "tags", 3, F.TYPE_STRING, repeated=True)
    _field(shelf, "opened_at", 4, F.TYPE_MESSAGE, ".google.protobuf.Timestamp")
    _field(shelf, "inner", 5, F.TYPE_MESSAGE, ".restdemo.v1.Inner")
    get = file.message_type.add(name="GetBookRequest")
    _field(get, "shelf_id", 1, F.TYPE_STRING)
    _field(get, "book_id", 2, F.TYPE_STRING)
    _field(get, "tags", 3, F.TYPE_STRING, repeated=True)
    _field(get, "filter", 4, F.TYPE_MESSAGE, ".restdemo.v1.Inner")
    _field(get, "page_size", 5, F.TYPE_INT32)
    update = file.message_type.add(name="UpdateShelfRequest")
    _field(update, "shelf_id", 1, F.TYPE_STRING)
    _field(update, "shelf", 2, F.TYPE_MESSAGE, ".restdemo.v1.Shelf")
    files = file.message_type.add(name="FindFilesRequest")
    _field(files, "path", 1, F.TYPE_STRING)

    service = file.service.add(name="DemoService")

    def rpc(name: str, request: str, response: str, rule: http_pb2.HttpRule) -> None:
        method = service.method.add(
            name=name, input_type=f".restdemo.v1.{request}", output_type=f".restdemo.v1.{response}"
        )
        method.options.Extensions[annotations_pb2.http].CopyFrom(rule)

    rpc("GetBook", "GetBookRequest", "Shelf", http_pb2.HttpRule(
        get="/v1/shelves/{shelf_id}/books/{book_id}",
        additional_bindings=[http_pb2.HttpRule(get="/v1/books/{book_id}")],
    ))
    rpc("UpdateShelf", "UpdateShelfRequest", "Shelf", http_pb2.HttpRule(
        patch="/v1/shelves/{shelf_id}:update", body="shelf", response_body="tags",
    ))
    rpc("CreateShelf", "Shelf", "Shelf", http_pb2.HttpRule(post="/v1/shelves", body="*"))
    rpc("FindFiles", "FindFilesRequest", "Shelf", http_pb2.HttpRule(
        custom=http_pb2.CustomHttpPattern(kind="SEARCH", path="/v1/files/{path=**}"),
    ))
    pool = descriptor_pool.Default()
    try:
        return pool.FindServiceByName("restdemo.v1.DemoService")
    except KeyError:
        pool.Add(file)
        return pool.FindServiceByName("restdemo.v1.DemoService")


DEMO = _demo_service()
ROUTES = {(r.method.name, r.binding_index): r for r in build_routes([DEMO])}


def _match(route: Route, path: str):
    values = route.template.match(path)
    assert values is not None, path
    return values


def test_every_binding_becomes_a_route_with_its_declared_success_status() -> None:
    shape = {
        key: (r.http_method, r.template.openapi_path, r.success_status)
        for key, r in ROUTES.items()
    }
    assert shape == {
        ("GetBook", 0): ("GET", "/v1/shelves/{shelf_id}/books/{book_id}", 200),
        ("GetBook", 1): ("GET", "/v1/books/{book_id}", 200),
        ("UpdateShelf", 0): ("PATCH", "/v1/shelves/{shelf_id}:update", 200),
        ("CreateShelf", 0): ("POST", "/v1/shelves", 201),
        ("FindFiles", 0): ("SEARCH", "/v1/files/{path}", 200),
    }
    token_routes = {(r.http_method, r.template.template, r.success_status)
                    for r in build_routes([pb.DESCRIPTOR.services_by_name["TokenService"]])}
    assert ("POST", "/api/v1/api-tokens", 201) in token_routes
    assert ("POST", "/api/v1/api-keys", 201) in token_routes
    assert ("POST", "/api/v1/authenticate", 200) in token_routes


def test_path_templates_match_like_grpc_gateway() -> None:
    get = ROUTES[("GetBook", 0)]
    assert _match(get, "/v1/shelves/s1/books/b%2F2") == {("shelf_id",): "s1", ("book_id",): "b/2"}
    assert get.template.match("/v1/shelves/s1/books/") is None
    assert get.template.match("/v1/shelves/s1/books/b/extra") is None
    update = ROUTES[("UpdateShelf", 0)]
    assert _match(update, "/v1/shelves/s9:update") == {("shelf_id",): "s9"}
    assert update.template.match("/v1/shelves/s9") is None
    files = ROUTES[("FindFiles", 0)]
    assert _match(files, "/v1/files/a/b/c.txt") == {("path",): "a/b/c.txt"}
    nested = parse_template("/v1/{shelf.id}/x/{name=projects/*/items/*}")
    assert nested.match("/v1/s1/x/projects/p/items/i") == {
        ("shelf", "id"): "s1", ("name",): "projects/p/items/i",
    }
    with pytest.raises(ValueError):
        parse_template("v1/no-leading-slash")


def test_query_parameters_in_both_spellings_and_repeated() -> None:
    route = ROUTES[("GetBook", 0)]
    query = [("tags", "a"), ("tags", "b"), ("filter.count", "5"), ("filter.flag", "true"),
             ("filter.kind", "BIG"), ("page_size", "3")]
    values = _match(route, "/v1/shelves/s1/books/b1")
    message = build_request(route, values, query, None)
    assert message.shelf_id == "s1" and message.book_id == "b1"
    assert list(message.tags) == ["a", "b"] and message.page_size == 3
    assert (message.filter.count, message.filter.flag, message.filter.kind) == (5, True, 1)
    camel = build_request(route, values, [("pageSize", "4")], None)
    assert camel.page_size == 4
    with pytest.raises(ApiError) as bad:
        build_request(route, values, [("pageSize", "4"), ("page_size", "5")], None)
    assert bad.value.status == 422
    with pytest.raises(ApiError) as bad:
        build_request(route, values, [("filter.flag", "maybe")], None)
    assert bad.value.details[0]["field"] == "filter.flag"  # the parameter as sent
    with pytest.raises(ApiError) as bad:  # path-bound fields are not query parameters
        build_request(route, values, [("shelfId", "other")], None)
    assert bad.value.status == 422
    with pytest.raises(ApiError) as bad:
        build_request(route, values, [("access_token", "x")], None)
    assert bad.value.status == 401


def test_single_field_body_and_path_override() -> None:
    route = ROUTES[("UpdateShelf", 0)]
    body = parse_json(b'{"title": "Poems", "openedAt": "2030-01-02T03:04:05+01:00"}')
    message = build_request(route, {("shelf_id",): "s1"}, [], body)
    assert message.shelf_id == "s1" and message.shelf.title == "Poems"
    assert message.shelf.opened_at.ToJsonString() == "2030-01-02T02:04:05Z"
    with pytest.raises(ApiError) as bad:
        build_request(route, {("shelf_id",): "s1"}, [], {"title": "x", "inner": {"cnt": 1}})
    assert bad.value.details == [{"field": "shelf.inner.cnt", "description": "unknown field"}]
    create = ROUTES[("CreateShelf", 0)]
    message = build_request(create, {}, [], {"opened_at": None, "tags": ["x"]})
    assert not message.HasField("opened_at") and list(message.tags) == ["x"]
    with pytest.raises(ApiError):
        build_request(create, {}, [("title", "query is not bound when body is *")], {})


def test_two_spellings_of_one_field_are_refused_at_any_depth() -> None:
    create = ROUTES[("CreateShelf", 0)]
    with pytest.raises(ApiError) as bad:
        build_request(create, {}, [], {"opened_at": "2030-01-01T00:00:00Z", "openedAt": None})
    assert bad.value.status == 422
    assert [d["field"] for d in bad.value.details] == ["openedAt"]
    assert "opened_at" in bad.value.details[0]["description"]
    with pytest.raises(ApiError) as bad:  # one spelling twice: the JSON parser refuses it
        parse_json(b'{"inner": {"count": 1, "count": 2}}')
    with pytest.raises(ApiError) as bad:
        build_request(ROUTES[("UpdateShelf", 0)], {("shelf_id",): "s"}, [],
                      {"inner": {"count": 1}, "title": "t", "tags": [], "opened_at": None,
                       "openedAt": None})
    assert [d["field"] for d in bad.value.details] == ["shelf.openedAt"]


def test_responses_have_every_field_with_nulls_and_arrays() -> None:
    route = ROUTES[("CreateShelf", 0)]
    assert render_response(route, route.response_class()) == {
        "id": "", "title": "", "tags": [], "openedAt": None, "inner": None,
    }
    shelf = route.response_class(id="s", opened_at=timestamp_pb2.Timestamp(seconds=1, nanos=0))
    shelf.inner.count = 2**40
    rendered = render_response(route, shelf)
    assert rendered["openedAt"] == "1970-01-01T00:00:01Z"
    assert rendered["inner"] == {"count": str(2**40), "flag": False, "kind": "KIND_UNSPECIFIED"}
    update = ROUTES[("UpdateShelf", 0)]
    assert render_response(update, shelf) == []
    list_route = next(r for r in build_routes([pb.DESCRIPTOR.services_by_name["TokenService"]])
                      if r.method.name == "ListTokens")
    assert render_response(list_route, pb.ListTokensResponse()) == {
        "tokens": [], "nextPageToken": "",
    }


def test_openapi_for_an_unseen_service() -> None:
    doc = build_openapi(build_routes([DEMO]), title="demo")
    get = doc["paths"]["/v1/shelves/{shelf_id}/books/{book_id}"]["get"]
    params = {p["name"]: p for p in get["parameters"]}
    assert params["shelf_id"]["in"] == "path" and params["shelf_id"]["required"] is True
    assert params["tags"]["schema"] == {"type": "array", "items": {"type": "string"}}
    assert params["filter.count"]["schema"]["type"] == "string"  # int64 is a JSON string
    assert params["filter.kind"]["schema"]["enum"] == ["KIND_UNSPECIFIED", "BIG"]
    assert "shelfId" not in params and "shelf_id" not in [p for p in params if p != "shelf_id"]
    update = doc["paths"]["/v1/shelves/{shelf_id}:update"]["patch"]
    body = update["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"anyOf": [{"$ref": "#/components/schemas/ShelfInput"}, {"type": "null"}]}
    ok = update["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"type": "array", "items": {"type": "string"}}
    assert "201" in doc["paths"]["/v1/shelves"]["post"]["responses"]
    shelf = doc["components"]["schemas"]["Shelf"]
    assert shelf["properties"]["openedAt"] == {"type": ["string", "null"], "format": "date-time"}
    assert set(shelf["required"]) == {"id", "title", "tags", "openedAt", "inner"}
    assert "required" not in doc["components"]["schemas"]["ShelfInput"]


def test_json_field_paths() -> None:
    response = pb.CreateTokenResponse.DESCRIPTOR
    assert json_field_path("api_token.expires_at", response) == "apiToken.expiresAt"
    assert json_field_path("scopes[1]", pb.CreateTokenRequest.DESCRIPTOR) == "scopes[1]"
    assert json_field_path("expiresAt", pb.CreateTokenRequest.DESCRIPTOR) == "expiresAt"
    assert json_field_path("some_other.deep_field", None) == "someOther.deepField"


class _FakeError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str, rich=None) -> None:
        self._code, self._details, self._rich = code, details, rich

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self):
        if self._rich is None:
            return ()
        return (("grpc-status-details-bin", self._rich.SerializeToString()),)


def test_status_mapping_hides_internals_and_carries_retry_after() -> None:
    leak = "Exception calling application: Traceback (most recent call last) at /srv/x.py"
    for code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                 grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED):
        error = from_rpc_error(_FakeError(code, leak), None)
        assert (error.status, error.code) == (500, "internal_error")
        assert "Traceback" not in error.message and "/srv" not in error.message
    # A refused state change is the caller's to act on: 409 with the server's reason.
    error = from_rpc_error(_FakeError(grpc.StatusCode.FAILED_PRECONDITION, "already rotated"), None)
    assert (error.status, error.code, error.message) == (409, "conflict", "already rotated")
    rich = status_pb2.Status(code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message="slow down")
    rich.details.add().Pack(
        error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2, nanos=5))
    )
    error = from_rpc_error(_FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", rich), None)
    assert (error.status, error.code, error.headers["Retry-After"]) == (429, "rate_limited", "3")
    rich = status_pb2.Status(code=3, message="expires_at: must be in the future")
    bad = error_details_pb2.BadRequest()
    bad.field_violations.add(field="expires_at", description="must be in the future")
    rich.details.add().Pack(bad)
    error = from_rpc_error(
        _FakeError(grpc.StatusCode.INVALID_ARGUMENT, rich.message, rich),
        pb.CreateTokenRequest.DESCRIPTOR,
    )
    assert error.body() == {"error": {
        "code": "validation_error", "message": "expiresAt: must be in the future",
        "details": [{"field": "expiresAt", "description": "must be in the future"}],
    }}


def test_openapi_names_a_nested_path_variable_by_its_field_unless_that_is_ambiguous() -> None:
    assert parse_template("/v1/tokens/{api_token.id}").openapi_path == "/v1/tokens/{id}"
    both = parse_template("/v1/{a.id}/{b.id}")
    assert both.openapi_path == "/v1/{a.id}/{b.id}"
    assert [v.openapi_name for v in both.variables] == ["a.id", "b.id"]


def test_a_patch_without_a_mask_takes_the_body_keys_as_its_mask() -> None:
    routes = {(r.method.name, r.http_method): r
              for r in build_routes([pb.DESCRIPTOR.services_by_name["TokenService"]])}
    patch = routes[("UpdateToken", "PATCH")]
    path = {("api_token", "id"): "t1"}
    body = {"name": "n", "expiresAt": None, "rate_limit": {"requests": 1, "period": "1s"}}
    request = build_request(patch, path, [], body)
    assert list(request.update_mask.paths) == ["name", "expires_at", "rate_limit"]
    assert request.api_token.id == "t1" and request.api_token.name == "n"
    assert not request.api_token.HasField("expires_at")
    explicit = build_request(patch, path, [("updateMask", "name")], {"name": "n", "scopes": []})
    assert list(explicit.update_mask.paths) == ["name"]
    assert list(build_request(patch, path, [], None).update_mask.paths) == []
