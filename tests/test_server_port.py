"""A teacher server owns its port: a second server on the same port is refused instead of sharing it.

gRPC sets SO_REUSEPORT by default, so without an exclusive bind a second (say, unauthenticated) server with
another model binds the same port and the kernel spreads new connections between the two.
"""

from __future__ import annotations

import grpc
import pytest
from teacher_server_harness import events, launch_server, save_tiny_teacher, start_servers, stop_servers

from dskd.protos import teacher_pb2 as pb
from dskd.protos import teacher_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration


def test_a_second_server_on_a_port_in_use_fails_in_one_line_and_the_first_keeps_serving(tmp_path):
    model = save_tiny_teacher(tmp_path / "model", hidden_size=32, layers=1)
    (first,) = start_servers([(model, (), "first")], tmp_path)
    try:
        process, _, log_path = launch_server(model, tmp_path, "--port", str(first.port), name="second")
        try:
            code = process.wait(timeout=90)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        log = log_path.read_text()
        assert code == 2, log[-2000:]
        errors = [line for line in log.splitlines() if line.startswith("serve_teacher:")]
        assert len(errors) == 1 and "address in use" in errors[0] and str(first.port) in errors[0], log[-2000:]
        assert "Traceback" not in log and '"event": "listening"' not in log
        # Every fresh connection still reaches the first server, and only it.
        fingerprint = next(e["fingerprint"] for e in events(first) if e["event"] == "listening")
        for _ in range(5):
            with grpc.insecure_channel(first.address) as channel:
                info = pb_grpc.TeacherStub(channel).GetInfo(pb.GetInfoRequest(), timeout=30)
                assert info.fingerprint == fingerprint
    finally:
        assert stop_servers([first]) == [0]
