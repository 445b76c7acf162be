"""Client library for tokenservice: stubs re-exported, typed client to come."""

from tokenservice.v1 import token_service_pb2, token_service_pb2_grpc

__all__ = ["token_service_pb2", "token_service_pb2_grpc"]
