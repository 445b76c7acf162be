"""Calls the example consumer with a tokenservice token.

    python examples/consumer/client.py --token "$TOKEN" whoami
    python examples/consumer/client.py --token "$TOKEN" create "Gold card"
    python examples/consumer/client.py --token "$TOKEN" get 1
    python examples/consumer/client.py --token "$TOKEN" list

Exits 0 on success; on a gRPC error prints the status code and message and exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from google.protobuf import json_format

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for the generated passes_pb2

import passes_pb2 as pb  # noqa: E402
import passes_pb2_grpc as pb_grpc  # noqa: E402
from tokenservice_client import token_credentials  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="call the example passes service")
    parser.add_argument("--target", default=os.environ.get("PASSES_TARGET", "localhost:50061"))
    parser.add_argument("--token", default=os.environ.get("TOKEN"), help="env TOKEN")
    parser.add_argument("command", choices=["whoami", "create", "get", "list"])
    parser.add_argument("arg", nargs="?", default="")
    args = parser.parse_args(argv)
    if not args.token:
        parser.error("give --token or set TOKEN")

    # The call-credentials one-liner: the token rides on every call as
    # `authorization: Bearer ...`. Local credentials because the example runs on one
    # machine; use token_credentials(args.token) (TLS) for a remote service.
    creds = token_credentials(args.token, grpc.local_channel_credentials())
    with grpc.secure_channel(args.target, creds) as channel:
        stub = pb_grpc.PassServiceStub(channel)
        # wait_for_ready: a server started a moment ago (`server.py &`) is waited
        # for, within the deadline, instead of failing at once with UNAVAILABLE.
        call = {"timeout": 10, "wait_for_ready": True}
        try:
            if args.command == "whoami":
                replies = [stub.WhoAmI(pb.WhoAmIRequest(), **call)]
            elif args.command == "create":
                replies = [stub.CreatePass(pb.CreatePassRequest(title=args.arg), **call)]
            elif args.command == "get":
                replies = [stub.GetPass(pb.GetPassRequest(id=args.arg), **call)]
            else:
                replies = list(stub.ListPasses(pb.ListPassesRequest(), **call))
        except grpc.RpcError as err:
            print(f"{err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    for reply in replies:
        print(json_format.MessageToJson(reply, indent=None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
