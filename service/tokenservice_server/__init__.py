"""tokenservice: a self-hosted API-token service over gRPC."""

__version__ = "0.1.0"
