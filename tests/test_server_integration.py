"""The teacher server as users start it: a subprocess on an ephemeral loopback port, talked to over gRPC."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2
from teacher_server_harness import (
    REPO,
    SERVE_SCRIPT,
    events,
    health_status,
    make_self_signed_cert,
    save_tiny_teacher,
    start_servers,
    stop_servers,
)

from dskd.errors import TeacherError
from dskd.protos import teacher_pb2 as pb
from dskd.protos import teacher_pb2_grpc as pb_grpc
from dskd.servers.client import RemoteTeacher
from dskd.servers.wire import MAX_MESSAGE_BYTES, PART_BYTES, int32_bytes, pack_sequences
from dskd.types import SignalRequest

pytestmark = pytest.mark.integration
TOKEN = "test-token-4f1e"
VOCAB = 32000
RESPONSE_LIMIT = 16_000_000


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("servers")
    model = save_tiny_teacher(root / "model")
    token_file = root / "token"
    token_file.write_text(TOKEN + "\n")
    cert, key = make_self_signed_cert(root / "tls")
    plain, auth, tls = start_servers(
        [
            (model, ("--reflection", "--max-response-bytes", str(RESPONSE_LIMIT), "--max-top-k", "64"), "plain"),
            (model, ("--auth-token-file", str(token_file)), "auth"),
            (model, ("--tls-cert", str(cert), "--tls-key", str(key), "--auth-token-file", str(token_file)), "tls"),
        ],
        root,
    )
    yield {
        "root": root,
        "model": model,
        "plain": plain,
        "auth": auth,
        "tls": tls,
        "cert": cert,
        "token_file": token_file,
    }
    assert stop_servers([plain, auth, tls]) == [0, 0, 0]


def stub(address: str) -> pb_grpc.TeacherStub:
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    return pb_grpc.TeacherStub(grpc.insecure_channel(address, options=options))


def score_request(
    sequences=((1, 450, 4996, 17354), (1, 22172)), positions=((0, 3), (1,)), **outputs
) -> pb.ScoreRequest:
    outputs = {"hidden_states": True, "top_k": 8, **outputs}
    return pb.ScoreRequest(
        request_id="r1",
        tokens=pack_sequences([list(s) for s in sequences]),
        positions=int32_bytes(np.array([p for ps in positions for p in ps], dtype=np.int64)),
        position_counts=[len(p) for p in positions],
        outputs=pb.OutputSpec(**outputs),
    )


def read_score(stream) -> list[str]:
    return [part.WhichOneof("part") for part in stream]


def test_server_reports_serving_and_describes_its_model(setup):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dskd.models.teacher import LocalTeacher

    server = setup["plain"]
    assert health_status(server.address, service="") == health_pb2.HealthCheckResponse.SERVING
    info = stub(server.address).GetInfo(pb.GetInfoRequest(), timeout=10)
    local = LocalTeacher(
        AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32),
        AutoTokenizer.from_pretrained(setup["model"]),
    )
    assert info.protocol_version == "dskd.teacher.v1"
    assert info.fingerprint == local.fingerprint  # same weights, tokenizer and dtype: same fingerprint
    assert (info.tokenizer_size, info.hidden_size, info.num_layers, info.lm_head_rows) == (VOCAB, 64, 2, VOCAB)
    assert info.compute_dtype == pb.FP32
    assert (info.bos_id, info.eos_id) == (1, 2)
    assert (info.max_seq_len, info.max_batch_tokens, info.max_top_k) == (256, 2048, 64)
    assert info.part_bytes == PART_BYTES
    assert set(info.capabilities) >= {"hidden_states", "top_k", "logits", "generate"}
    assert not info.lm_head_has_bias and info.logit_scale == 1.0 and info.final_logit_softcap == 0.0
    assert [e["event"] for e in events(server)][:2] == ["listening", "serving"]


def test_score_stream_is_header_parts_trailer_with_bounded_parts(setup):
    # 100 rows of fp32 logits over 32000 tokens: 12.8 MB, so several parts.
    request = score_request(
        sequences=[list(range(1, 101))],
        positions=[list(range(100))],
        hidden_states=False,
        top_k=0,
        logits=True,
        wire_dtype=pb.FP32,
    )
    parts = list(stub(setup["plain"].address).Score(request, timeout=60))
    kinds = [p.WhichOneof("part") for p in parts]
    assert kinds[0] == "header" and kinds[-1] == "trailer" and set(kinds[1:-1]) == {"tensor"}
    header = parts[0].header
    assert header.request_id == "r1" and header.fingerprint and list(header.rows_per_sequence) == [100]
    (spec,) = header.tensors
    assert (spec.name, spec.dtype, list(spec.shape), spec.nbytes) == ("logits", pb.FP32, [100, VOCAB], 100 * VOCAB * 4)
    tensor_parts = [p.tensor for p in parts[1:-1]]
    assert len(tensor_parts) == -(-spec.nbytes // PART_BYTES)
    assert all(len(p.data) <= PART_BYTES and p.ByteSize() < 4 * 1024 * 1024 for p in tensor_parts)
    assert [p.offset for p in tensor_parts] == list(range(0, spec.nbytes, PART_BYTES))
    assert parts[-1].trailer.num_tokens == 100 and parts[-1].trailer.forward_ns > 0


def _bad_requests():
    def edit(fn, **outputs):
        request = score_request(**outputs)
        fn(request)
        return request

    long_seq = list(range(1, 258))
    return {
        "id_outside_vocabulary": (score_request(sequences=[(1, VOCAB, 3)], positions=[(0,)]), "tokens.ids"),
        "negative_id": (score_request(sequences=[(1, -5, 3)], positions=[(0,)]), "tokens.ids"),
        "too_long": (score_request(sequences=[long_seq], positions=[(0,)]), "tokens.lengths"),
        "empty_batch": (pb.ScoreRequest(outputs=pb.OutputSpec(top_k=2)), "tokens.lengths"),
        "empty_sequence": (edit(lambda r: r.tokens.lengths.__setitem__(1, 0)), "tokens.lengths"),
        "ids_bytes_mismatch": (edit(lambda r: setattr(r.tokens, "ids", r.tokens.ids[:-2])), "tokens.ids"),
        "position_past_end": (score_request(positions=((0, 4), (1,))), "positions"),
        "negative_position": (score_request(positions=((0,), (-1,))), "positions"),
        "counts_mismatch": (edit(lambda r: r.position_counts.append(0)), "position_counts"),
        "top_k_above_limit": (score_request(top_k=65), "outputs.top_k"),
        "unknown_wire_dtype": (score_request(wire_dtype=7), "outputs.wire_dtype"),
        "nothing_requested": (score_request(hidden_states=False, top_k=0), "outputs"),
        "over_token_budget": (score_request(sequences=[[1] * 200] * 11, positions=[(0,)] * 11), "tokens"),
        "response_too_large": (
            score_request(
                sequences=[list(range(1, 201))],
                positions=[list(range(200))],
                hidden_states=False,
                top_k=0,
                logits=True,
                wire_dtype=pb.FP32,
            ),
            "outputs",
        ),
    }


BAD = _bad_requests()


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_score_request_is_invalid_argument_naming_the_field(setup, case):
    request, field = BAD[case]
    with pytest.raises(grpc.RpcError) as info:
        read_score(stub(setup["plain"].address).Score(request, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field + ":"), info.value.details()


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"top_p": -0.5}, "top_p"),
        ({"temperature": -1.0}, "temperature"),
        ({"prompts": pack_sequences([[1, VOCAB]])}, "prompts.ids"),
    ],
)
def test_bad_generate_request_is_invalid_argument(setup, overrides, field):
    request = pb.GenerateRequest(
        **{"prompts": pack_sequences([[1, 2]]), "max_new_tokens": 2, "temperature": 1.0, "top_p": 1.0, **overrides}
    )
    with pytest.raises(grpc.RpcError) as info:
        stub(setup["plain"].address).Generate(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field + ":")


def test_bad_head_dtype_is_invalid_argument(setup):
    with pytest.raises(grpc.RpcError) as info:
        list(stub(setup["plain"].address).FetchHead(pb.FetchHeadRequest(dtype=pb.INT32), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_server_keeps_serving_after_bad_requests(setup):
    s = stub(setup["plain"].address)
    for request, _ in BAD.values():
        with pytest.raises(grpc.RpcError):
            read_score(s.Score(request, timeout=30))
    assert read_score(s.Score(score_request(), timeout=30)) == [
        "header",
        "tensor",
        "tensor",
        "tensor",
        "tensor",
        "trailer",
    ]
    assert health_status(setup["plain"].address) == health_pb2.HealthCheckResponse.SERVING


def test_request_for_another_model_is_failed_precondition(setup):
    request = score_request()
    request.expected_fingerprint = "0" * 32
    with pytest.raises(grpc.RpcError) as info:
        read_score(stub(setup["plain"].address).Score(request, timeout=30))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("metadata", [None, (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)])
def test_call_without_the_right_bearer_token_is_unauthenticated(setup, metadata):
    s = stub(setup["auth"].address)
    with pytest.raises(grpc.RpcError) as info:
        s.GetInfo(pb.GetInfoRequest(), timeout=10, metadata=metadata)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as info:
        read_score(s.Score(score_request(), timeout=10, metadata=metadata))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_call_with_the_bearer_token_on_plaintext_is_served(setup, tmp_path):
    s = stub(setup["auth"].address)
    info = s.GetInfo(pb.GetInfoRequest(), timeout=10, metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert info.tokenizer_size == VOCAB
    with RemoteTeacher(setup["auth"].address, auth_token=TOKEN, cache_dir=tmp_path) as teacher:
        ids = torch.tensor([[1, 450, 4996]])
        signal = teacher.score(ids, torch.ones_like(ids), torch.tensor([0, 2]), SignalRequest(top_k=4))
        assert signal.topk_ids.shape == (2, 4)


def test_remote_teacher_without_token_gets_a_teacher_error_with_a_hint(setup, tmp_path):
    with pytest.raises(
        TeacherError, match=rf"teacher at {setup['auth'].address}: .*UNAUTHENTICATED.*pass the server's token"
    ):
        RemoteTeacher(setup["auth"].address, cache_dir=tmp_path)


def test_health_is_open_without_a_token(setup):
    assert health_status(setup["auth"].address) == health_pb2.HealthCheckResponse.SERVING


def test_tls_server_serves_a_client_that_trusts_its_certificate(setup, tmp_path):
    with RemoteTeacher(
        setup["tls"].address, auth_token=TOKEN, tls_ca_file=setup["cert"], cache_dir=tmp_path, wire_dtype="float32"
    ) as teacher:
        ids = torch.tensor([[1, 450, 4996, 17354]])
        signal = teacher.score(
            ids, torch.ones_like(ids), torch.tensor([1, 3]), SignalRequest(hidden_states=True, top_k=4)
        )
        assert signal.hidden_states.shape == (2, 64)


def test_tls_server_refuses_plaintext_clients(setup, tmp_path):
    with pytest.raises(TeacherError, match=rf"teacher at {setup['tls'].address}: .*UNAVAILABLE"):
        RemoteTeacher(setup["tls"].address, auth_token=TOKEN, cache_dir=tmp_path, timeout_s=5)


def test_tls_server_refuses_clients_that_do_not_trust_its_certificate(setup, tmp_path):
    other_cert, _ = make_self_signed_cert(tmp_path / "other")
    with pytest.raises(TeacherError, match="UNAVAILABLE"):
        RemoteTeacher(setup["tls"].address, auth_token=TOKEN, tls_ca_file=other_cert, cache_dir=tmp_path, timeout_s=5)


def test_reflection_lists_the_teacher_service(setup):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    database = ProtoReflectionDescriptorDatabase(grpc.insecure_channel(setup["plain"].address))
    assert "dskd.teacher.v1.Teacher" in set(database.get_services())


def test_reflection_is_off_by_default(setup):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    database = ProtoReflectionDescriptorDatabase(grpc.insecure_channel(setup["auth"].address))
    with pytest.raises(grpc.RpcError):
        list(database.get_services())


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SERVE_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )


def test_wide_host_without_token_is_refused_at_start():
    result = run_script("--model", "unused", "--host", "0.0.0.0", "--port", "0")
    assert result.returncode == 2
    assert "--auth-token-file" in result.stderr and "--insecure" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unloadable_model_is_a_one_line_error(tmp_path):
    result = run_script("--model", str(tmp_path / "missing"), "--port", "0", "--device", "cpu")
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1].startswith(f"serve_teacher: --model {tmp_path / 'missing'}: cannot load")
    )


def test_sigterm_drains_finishes_calls_and_exits_zero(setup, tmp_path):
    (server,) = start_servers([(setup["model"], ("--drain-seconds", "3"), "drain")], tmp_path)
    teacher = RemoteTeacher(server.address, cache_dir=tmp_path, max_attempts=1, timeout_s=20)
    ids = torch.randint(0, VOCAB, (8, 200))
    rows = torch.arange(ids.numel())
    request = SignalRequest(hidden_states=True, top_k=16)
    in_flight = teacher.score_async(ids, torch.ones_like(ids), rows, request)  # a large call, sent before SIGTERM
    time.sleep(0.05)
    server.terminate()
    deadline = time.monotonic() + 10
    while health_status(server.address) != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline, "health never turned NOT_SERVING after SIGTERM"
        time.sleep(0.05)
    # Draining: health says go away, but calls that still arrive are answered.
    during = teacher.score(ids[:1, :10], torch.ones_like(ids[:1, :10]), torch.tensor([3]), SignalRequest(top_k=4))
    assert during.topk_ids.shape == (1, 4)
    assert in_flight.result(timeout=60).hidden_states.shape == (ids.numel(), 64)
    assert server.process.wait(timeout=60) == 0
    assert [e["event"] for e in events(server)][-2:] == ["draining", "stopped"]
    # Once it is gone, the client says so (naming the address) instead of returning anything.
    with pytest.raises(
        TeacherError, match=rf"teacher at {server.address}: Score failed with UNAVAILABLE.*serve_teacher.py running"
    ):
        teacher.score(ids[:1, :10], torch.ones_like(ids[:1, :10]), torch.tensor([3]), SignalRequest(top_k=4))
    teacher.close()


def test_concurrent_clients_are_merged_into_shared_forwards(setup):
    s = stub(setup["plain"].address)
    trailers, errors = [], []

    def client():
        try:
            for _ in range(6):
                parts = list(
                    s.Score(
                        score_request(sequences=[list(range(1, 65))] * 2, positions=[list(range(64))] * 2), timeout=60
                    )
                )
                trailers.append(parts[-1].trailer)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert max(t.batch_requests for t in trailers) > 1
    assert all(t.batch_tokens <= 2048 for t in trailers)
