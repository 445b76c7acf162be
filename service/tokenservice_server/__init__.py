"""tokenservice: a self-hosted API-token service over gRPC."""

__version__ = "0.2.0"
