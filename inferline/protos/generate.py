"""Regenerate the committed protobuf/gRPC code and type stubs: `python -m inferline.protos.generate`.

Runs protoc from grpcio-tools with the repository root as the include path, so the generated
gRPC module imports `from inferline.protos import agent_pb2` (the installed import path), and
mypy-protobuf's plugins (found next to this interpreter) write the `.pyi` stubs.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTOS = Path(__file__).resolve().parent
ROOT = PROTOS.parent.parent
SOURCES = ("agent.proto",)


def protoc_args(source: Path) -> list[str]:
    bindir = Path(sys.executable).parent
    return [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        f"--mypy_out={ROOT}",
        f"--mypy_grpc_out={ROOT}",
        str(source.relative_to(ROOT)),
    ]


def main() -> int:
    try:
        from grpc_tools import protoc  # type: ignore[import-untyped]  # no stubs; a dev-only tool
    except ImportError:
        print("grpcio-tools is not installed. To fix: pip install grpcio-tools mypy-protobuf", file=sys.stderr)
        return 1
    for name in SOURCES:
        if protoc.main(protoc_args(PROTOS / name)) != 0:
            print(f"protoc failed on {name}", file=sys.stderr)
            return 1
        print(f"generated code for {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
