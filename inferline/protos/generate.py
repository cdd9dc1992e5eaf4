"""Regenerate the committed protobuf/gRPC code and type stubs: `python -m inferline.protos.generate`.

Runs protoc from grpcio-tools with the repository root as the include path, so the generated
gRPC modules import `from inferline.protos import agent_pb2` (the installed import path), and
mypy-protobuf's plugins (found next to this interpreter) write the `.pyi` stubs.

`kserve_v2.proto` declares the Open Inference Protocol's messages in the package `inference`,
the same names as tritonclient's own generated module (Triton's superset of the protocol). Both
are loaded in one process (the router talks to Triton through tritonclient and serves the
protocol itself), and protobuf refuses a second file defining the same symbols in its default
descriptor pool, so the generated kserve_v2_pb2.py is rewritten to build into a private pool.
The wire format is unaffected: only field numbers and the service's full name travel.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTOS = Path(__file__).resolve().parent
ROOT = PROTOS.parent.parent
SOURCES = ("agent.proto", "kserve_v2.proto")
PRIVATE_POOL = ("kserve_v2.proto",)
"""Protos whose symbols other installed packages also define (see the module docstring)."""

DEFAULT_POOL_CALL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
PRIVATE_POOL_CALL = (
    "# Private pool: tritonclient defines the same `inference.*` symbols in the default pool\n"
    "# (rewritten by inferline/protos/generate.py).\n"
    "POOL = _descriptor_pool.DescriptorPool()\n"
    "DESCRIPTOR = POOL.AddSerializedFile("
)


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


def use_private_pool(generated: Path) -> None:
    """Make a generated `_pb2.py` build its descriptors into its own pool instead of the default one."""
    text = generated.read_text()
    if DEFAULT_POOL_CALL not in text:
        raise RuntimeError(f"{generated.name}: protoc's output changed; update DEFAULT_POOL_CALL in generate.py")
    generated.write_text(text.replace(DEFAULT_POOL_CALL, PRIVATE_POOL_CALL, 1))


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
        if name in PRIVATE_POOL:
            use_private_pool(PROTOS / f"{Path(name).stem}_pb2.py")
        print(f"generated code for {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
