"""The committed generated modules match `protos/teacher.proto` (regenerated into a temporary folder)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from dskd.protos import teacher_pb2

pytest.importorskip("grpc_tools", reason="grpcio-tools (a dev dependency) regenerates the protocol modules")

REPO = Path(__file__).resolve().parents[1]
# Lines that only record which generator version ran; a different grpcio-tools release changes them
# without any change to the protocol.
VERSION_LINES = re.compile(
    r"^# Protobuf Python Version: .*$|^GRPC_GENERATED_VERSION = .*$|"
    r"_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)",
    re.MULTILINE,
)


def _load_regenerate():
    spec = importlib.util.spec_from_file_location("dskd_regenerate", REPO / "protos" / "regenerate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["teacher_pb2.py", "teacher_pb2.pyi", "teacher_pb2_grpc.py"])
def test_committed_module_matches_regenerated_from_proto(tmp_path, name):
    regenerate = _load_regenerate()
    regenerate.generate(tmp_path)
    fresh = VERSION_LINES.sub("<version>", (tmp_path / name).read_text())
    committed = VERSION_LINES.sub("<version>", (REPO / "protos" / name).read_text())
    assert fresh == committed, f"protos/{name} is stale: run `python protos/regenerate.py` and commit the result"


def test_drift_check_notices_a_changed_proto(tmp_path):
    regenerate = _load_regenerate()
    proto = (REPO / "protos" / "teacher.proto").read_text()
    changed = tmp_path / "src"
    changed.mkdir()
    (changed / "teacher.proto").write_text(
        proto.replace("uint32 batch_tokens = 6;", "uint32 batch_tokens = 6;\n  uint32 extra = 7;")
    )
    regenerate.generate(tmp_path / "out", proto_dir=changed)
    assert (tmp_path / "out" / "teacher_pb2.py").read_text() != (REPO / "protos" / "teacher_pb2.py").read_text()


def test_generated_grpc_module_imports_messages_from_the_package():
    text = (REPO / "protos" / "teacher_pb2_grpc.py").read_text()
    assert "from dskd.protos import teacher_pb2 as teacher__pb2" in text
    assert "\nimport teacher_pb2" not in text
    assert teacher_pb2.DESCRIPTOR.package == "dskd.teacher.v1"
