"""Calls the example consumer with a tokenservice token.

    python examples/consumer/client.py --token "$TOKEN" whoami
    python examples/consumer/client.py --token "$TOKEN" create "Gold card"
    python examples/consumer/client.py --token "$TOKEN" get 1
    python examples/consumer/client.py --token "$TOKEN" list
    python examples/consumer/client.py --token "$TOKEN" --rate-limit whoami

Exits 0 on success; on a gRPC error prints the status code and message (and when to
retry, if the server said) and exits 1. `--rate-limit` also prints the token's rate
limit standing the service passed on (`ratelimit-*` trailing metadata) to stderr.
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
from tokenservice_client.errors import error_from_rpc_error  # noqa: E402

RATE_LIMIT_KEYS = ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset")


def print_rate_limit(metadata: object) -> None:
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key in RATE_LIMIT_KEYS:
            print(f"{key}: {value}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="call the example passes service")
    parser.add_argument("--target", default=os.environ.get("PASSES_TARGET", "localhost:50061"))
    parser.add_argument("--token", default=os.environ.get("TOKEN"), help="env TOKEN")
    parser.add_argument("--rate-limit", action="store_true",
                        help="print the ratelimit-* metadata of the reply to stderr")
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
                reply, done = stub.WhoAmI.with_call(pb.WhoAmIRequest(), **call)
                replies = [reply]
            elif args.command == "create":
                reply, done = stub.CreatePass.with_call(
                    pb.CreatePassRequest(title=args.arg), **call)
                replies = [reply]
            elif args.command == "get":
                reply, done = stub.GetPass.with_call(pb.GetPassRequest(id=args.arg), **call)
                replies = [reply]
            else:
                done = stub.ListPasses(pb.ListPassesRequest(), **call)
                replies = list(done)
        except grpc.RpcError as err:
            retry = error_from_rpc_error(err).retry_delay
            after = f" (retry after {retry:g} s)" if retry is not None else ""
            print(f"{err.code().name}: {err.details()}{after}", file=sys.stderr)
            if args.rate_limit:
                print_rate_limit(err.trailing_metadata())  # type: ignore[attr-defined]
            return 1
    if args.rate_limit:
        print_rate_limit(done.trailing_metadata())
    for reply in replies:
        print(json_format.MessageToJson(reply, indent=None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
