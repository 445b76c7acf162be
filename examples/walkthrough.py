"""The five-minute walkthrough over gRPC: create a token, authenticate it, list, revoke.

    .venv/bin/python examples/walkthrough.py "$TOKEN"

TOKEN must hold api_token:manage (the README's walkthrough makes one with the
command line). TOKENSERVICE_TARGET says where tokenservice listens, by default
127.0.0.1:50051.
"""

import os
import sys

import grpc

from tokenservice.v1 import token_service_pb2 as pb
from tokenservice.v1 import token_service_pb2_grpc as pb_grpc

token = sys.argv[1]
target = os.environ.get("TOKENSERVICE_TARGET", "127.0.0.1:50051")
auth = [("authorization", f"Bearer {token}")]
with grpc.insecure_channel(target) as channel:
    stub = pb_grpc.TokenServiceStub(channel)
    created = stub.CreateToken(
        pb.CreateTokenRequest(name="POS Integration", scopes=["pass:read"]), metadata=auth
    )
    print("new token, shown once:", created.token)
    who = stub.Authenticate(pb.AuthenticateRequest(token=created.token))
    print("it belongs to:", who.user_email, who.org_id, list(who.scopes))
    for t in stub.ListTokens(pb.ListTokensRequest(), metadata=auth).tokens:
        print("listed:", t.token_prefix, t.name, list(t.scopes))
    revoked = stub.RevokeToken(pb.RevokeTokenRequest(id=created.api_token.id), metadata=auth)
    print("revoked at:", revoked.revoked_at.ToJsonString())
