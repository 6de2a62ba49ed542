"""Regenerate `teacher_pb2.py`, `teacher_pb2.pyi` and `teacher_pb2_grpc.py` from `teacher.proto`.

Run `python protos/regenerate.py` after editing the proto (needs `grpcio-tools`, a dev dependency). The
generated gRPC module imports its messages as a top-level `teacher_pb2`, which only resolves when `protos/`
is on `sys.path`; the import is rewritten to `from dskd.protos import teacher_pb2` so the package imports
cleanly wherever it is installed. `tests/test_protocol_drift.py` calls `generate()` into a temporary folder
and fails when the committed modules differ.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_NAME = "teacher.proto"
GENERATED = ("teacher_pb2.py", "teacher_pb2.pyi", "teacher_pb2_grpc.py")
_IMPORT_RE = re.compile(r"^import teacher_pb2 as teacher__pb2$", re.MULTILINE)
_FIXED_IMPORT = "from dskd.protos import teacher_pb2 as teacher__pb2"


def generate(out_dir: Path, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Compile `teacher.proto` into `out_dir` and fix the generated import; returns the written files."""
    import grpc_tools
    from grpc_tools import (
        protoc,  # imported here: grpcio-tools is only needed to regenerate
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(proto_dir / PROTO_NAME),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {proto_dir / PROTO_NAME}; see the messages above")
    grpc_module = out_dir / "teacher_pb2_grpc.py"
    text = grpc_module.read_text()
    fixed, count = _IMPORT_RE.subn(_FIXED_IMPORT, text)
    if count != 1:
        raise SystemExit(
            f"expected one `import teacher_pb2` line in {grpc_module}, found {count}; update regenerate.py"
        )
    grpc_module.write_text(fixed)
    return [out_dir / name for name in GENERATED]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_DIR, help="output folder (default: next to the proto)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
