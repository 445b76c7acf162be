"""Generates the Python stubs from protos/ with grpcio-tools.

`make protos` writes them into clients/python; tests/test_protos.py writes them
into a temporary directory and compares, so committed stubs cannot drift from
the protos.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[2] / "protos"
PROTO_FILES = ("tokenservice/v1/token_service.proto",)


def _include_dirs() -> list[str]:
    import google.api  # googleapis-common-protos ships annotations.proto here

    api_dir = Path(next(iter(google.api.__path__)))
    well_known = resources.files("grpc_tools") / "_proto"
    return [str(PROTO_ROOT), str(api_dir.parents[1]), str(well_known)]


def generate(out_dir: Path) -> None:
    """Writes *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every proto under out_dir's root."""
    from grpc_tools import protoc

    # Stubs land in <out_root>/tokenservice/v1/, mirroring the proto package.
    out_root = out_dir.parents[1]
    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["grpc_tools.protoc"]
    args += [f"-I{d}" for d in _include_dirs()]
    args += [f"--python_out={out_root}", f"--pyi_out={out_root}", f"--grpc_python_out={out_root}"]
    args += [str(PROTO_ROOT / f) for f in PROTO_FILES]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    generate(Path(sys.argv[1]).resolve())
