"""The committed stubs are exactly what `make protos` generates from protos/."""

from pathlib import Path

from tokenservice.v1 import token_service_pb2 as pb
from tokenservice_server.protogen import generate

GENERATED = Path(__file__).resolve().parents[1] / "clients/python/tokenservice/v1"


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    out = tmp_path / "tokenservice" / "v1"
    generate(out)
    names = sorted(p.name for p in out.iterdir() if p.is_file())
    assert names == ["token_service_pb2.py", "token_service_pb2.pyi", "token_service_pb2_grpc.py"]
    for name in names:
        assert (GENERATED / name).read_text() == (out / name).read_text(), (
            f"{name} is stale: run `make protos` and commit the result"
        )


def test_every_unary_rpc_has_an_http_rule_and_every_element_a_comment() -> None:
    from google.api import annotations_pb2

    service = pb.DESCRIPTOR.services_by_name["TokenService"]
    assert {m.name for m in service.methods} == {
        "CreateToken", "ListTokens", "GetToken", "RevokeToken", "Authenticate", "ListScopes",
        "RotateToken", "UpdateToken", "ListAuditEvents", "ReportLeakedTokens",
        "WatchTokenEvents",
    }
    for method in service.methods:
        if method.client_streaming or method.server_streaming:
            # A stream has no REST face, so no rule either.
            assert not method.GetOptions().HasExtension(annotations_pb2.http), method.name
            continue
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        assert rule.WhichOneof("pattern"), f"{method.name} has no google.api.http rule"
    source = (Path(__file__).resolve().parents[1]
              / "protos/tokenservice/v1/token_service.proto").read_text().splitlines()
    for i, line in enumerate(source):
        stripped = line.strip()
        if stripped.startswith(("message ", "rpc ", "service ")) or (
            stripped.endswith(";") and "=" in stripped and not stripped.startswith(
                ("option", "post", "get", "delete", "body", "syntax", "package", "import"))
        ):
            assert source[i - 1].strip().startswith("//"), f"line {i + 1} has no comment: {line}"
