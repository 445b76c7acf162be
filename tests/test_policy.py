"""Every RPC of the service declares its caller policy in exactly one place."""

from tokenservice.v1 import token_service_pb2 as pb
from tokenservice_server.policy import CALLER_POLICY, Caller, caller_for


def test_every_rpc_of_the_descriptor_has_a_policy() -> None:
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["TokenService"].methods}
    missing = methods - CALLER_POLICY.keys()
    assert not missing, f"RPCs without a caller policy: {sorted(missing)}"
    assert not CALLER_POLICY.keys() - methods, "policy names an RPC the service lacks"


def test_lookup_by_either_spelling() -> None:
    assert caller_for("/tokenservice.v1.TokenService/CreateToken") is Caller.BEARER
    assert caller_for("tokenservice.v1.TokenService.Authenticate") is Caller.ANONYMOUS
    assert caller_for("/tokenservice.v1.TokenService/NoSuchMethod") is None
    assert caller_for("/grpc.health.v1.Health/Check") is None
