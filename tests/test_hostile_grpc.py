"""Hostile input against a real teacher server, over raw gRPC: every malformed request gets the right status
and a one-line message, and the server is healthy and answers a valid request afterwards.

Requests are built with the generated messages where protobuf can express them, and as hand-made bytes where it
cannot (truncated or garbage messages, invalid UTF-8, a message larger than the server's receive limit).
tests/test_server_integration.py checks that each validation message names its field; this corpus adds the
extremes (int32/uint32 limits, negative and huge lengths and counts, unknown enum values, bytes that do not
parse, oversized messages, every method without a token) and checks them all against one live server.
"""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from teacher_server_harness import health_status, save_tiny_teacher, start_servers, stop_servers

from dskd.protos import teacher_pb2 as pb
from dskd.servers.wire import MAX_MESSAGE_BYTES, int32_bytes, pack_sequences

pytestmark = pytest.mark.integration
TOKEN = "hostile-test-token-7c1d"
VOCAB = 32000
MAX_TOP_K = 40000  # above the vocabulary, so a top-k over the vocabulary meets the vocabulary check
RESPONSE_LIMIT = 16_000_000
INT32_MAX, UINT32_MAX = 2**31 - 1, 2**32 - 1
INVALID, UNAUTH = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED
METHOD = "/dskd.teacher.v1.Teacher/"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    model = save_tiny_teacher(root / "model", hidden_size=32, layers=1)
    (root / "token").write_text(TOKEN + "\n")
    plain, auth = start_servers(
        [
            (model, ("--max-top-k", str(MAX_TOP_K), "--max-response-bytes", str(RESPONSE_LIMIT)), "plain"),
            (model, ("--auth-token-file", str(root / "token")), "auth"),
        ],
        root,
    )
    yield {"plain": plain, "auth": auth}
    assert stop_servers([plain, auth]) == [0, 0]


def _channel(address: str) -> grpc.Channel:
    # No send limit here: the oversized case must reach the server and be refused there.
    return grpc.insecure_channel(
        address, options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    )


def _raw_call(channel: grpc.Channel, method: str, payload: bytes, metadata=None) -> None:
    """Send `payload` as the request bytes of `method` and read the whole answer."""
    if method in ("GetInfo", "Generate"):
        channel.unary_unary(METHOD + method)(payload, timeout=60, metadata=metadata)
    else:
        list(channel.unary_stream(METHOD + method)(payload, timeout=60, metadata=metadata))


def score(sequences=((1, 450, 4996, 17354), (1, 22172)), positions=((0, 3), (1,)), **outputs) -> pb.ScoreRequest:
    return pb.ScoreRequest(
        request_id="hostile",
        tokens=pack_sequences([list(s) for s in sequences]),
        positions=int32_bytes(np.array([p for ps in positions for p in ps], dtype=np.int64)),
        position_counts=[len(p) for p in positions],
        outputs=pb.OutputSpec(**{"hidden_states": True, "top_k": 4, **outputs}),
    )


def edited(message, edit):
    edit(message)
    return message


def packed(ids: list[int], lengths: list[int]) -> pb.PackedTokens:
    return pb.PackedTokens(ids=np.asarray(ids, dtype="<i4").tobytes(), lengths=lengths)


def generate(**fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        **{"prompts": pack_sequences([[1, 450]]), "max_new_tokens": 2, "temperature": 1.0, "top_p": 1.0, **fields}
    )


VALID_SCORE = score().SerializeToString()
# Field 1 (request_id, a proto3 string) holding bytes that are not UTF-8: protobuf refuses to parse it.
BAD_UTF8 = b"\x0a\x02\xff\xfe" + VALID_SCORE

# case -> (method, request bytes, expected status, expected start of the message)
CASES = {
    # ids out of range
    "id_equal_to_vocabulary": ("Score", score(sequences=[(1, VOCAB)], positions=[(0,)]), INVALID, "tokens.ids"),
    "id_negative": ("Score", score(sequences=[(1, -1)], positions=[(0,)]), INVALID, "tokens.ids"),
    "id_int32_max": ("Score", score(sequences=[(1, INT32_MAX)], positions=[(0,)]), INVALID, "tokens.ids"),
    "id_int32_min": ("Score", score(sequences=[(-(2**31), 5)], positions=[(0,)]), INVALID, "tokens.ids"),
    # negative, zero and huge lengths; bytes that disagree with them
    "length_negative": (
        "Score",
        edited(score(), lambda r: r.tokens.CopyFrom(packed([1, 2, 3], [-3]))),
        INVALID,
        "tokens.lengths",
    ),
    "length_zero": (
        "Score",
        edited(score(), lambda r: r.tokens.CopyFrom(packed([1, 2], [2, 0]))),
        INVALID,
        "tokens.lengths",
    ),
    "length_int32_max": (
        "Score",
        edited(score(), lambda r: r.tokens.CopyFrom(packed([1, 2], [INT32_MAX]))),
        INVALID,
        "tokens.lengths",
    ),
    "lengths_sum_past_the_ids": (
        "Score",
        edited(score(), lambda r: r.tokens.CopyFrom(packed([1, 2], [200, 200]))),
        INVALID,
        "tokens.ids",
    ),
    "ids_not_whole_int32s": (
        "Score",
        edited(score(), lambda r: setattr(r.tokens, "ids", r.tokens.ids + b"\x01")),
        INVALID,
        "tokens.ids",
    ),
    "too_many_sequences": ("Score", score(sequences=[(1,)] * 5000, positions=[(0,)] * 5000), INVALID, "tokens"),
    "sequence_too_long": ("Score", score(sequences=[[1] * 257], positions=[(0,)]), INVALID, "tokens.lengths"),
    # empty batches
    "empty_message": ("Score", pb.ScoreRequest(), INVALID, "outputs"),
    "empty_batch": ("Score", pb.ScoreRequest(outputs=pb.OutputSpec(top_k=2)), INVALID, "tokens.lengths"),
    # positions
    "position_count_negative": (
        "Score",
        edited(score(), lambda r: r.position_counts.__setitem__(1, -1)),
        INVALID,
        "position_counts",
    ),
    "position_count_int32_max": (
        "Score",
        edited(score(), lambda r: r.position_counts.__setitem__(1, INT32_MAX)),
        INVALID,
        "positions",
    ),
    "positions_not_whole_int32s": (
        "Score",
        edited(score(), lambda r: setattr(r, "positions", r.positions[:-1])),
        INVALID,
        "positions",
    ),
    "position_past_its_sequence": ("Score", score(positions=((0, 4), (1,))), INVALID, "positions"),
    "position_int32_min": ("Score", score(positions=((0, -(2**31)), (1,))), INVALID, "positions"),
    # top-k
    "top_k_above_vocabulary": ("Score", score(top_k=VOCAB + 1), INVALID, "outputs.top_k"),
    "top_k_uint32_max": ("Score", score(top_k=UINT32_MAX), INVALID, "outputs.top_k"),
    # unknown and unsupported enum values (proto3 keeps them as plain integers)
    "wire_dtype_unknown": ("Score", score(wire_dtype=99), INVALID, "outputs.wire_dtype"),
    "wire_dtype_negative": ("Score", score(wire_dtype=-1), INVALID, "outputs.wire_dtype"),
    "wire_dtype_int32": ("Score", score(wire_dtype=pb.INT32), INVALID, "outputs.wire_dtype"),
    "head_dtype_unknown": ("FetchHead", pb.FetchHeadRequest(dtype=99), INVALID, "dtype"),
    "head_dtype_int32": ("FetchHead", pb.FetchHeadRequest(dtype=pb.INT32), INVALID, "dtype"),
    # answers over the server's size limits
    "response_too_large": (
        "Score",
        score(
            sequences=[list(range(1, 201))],
            positions=[list(range(200))],
            hidden_states=False,
            top_k=0,
            logits=True,
            wire_dtype=pb.FP32,
        ),
        INVALID,
        "outputs",
    ),
    "oversized_message": (
        "Score",
        pb.ScoreRequest(request_id="x" * (MAX_MESSAGE_BYTES + 1024)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "",
    ),
    # bytes that are not a message
    "truncated_score": ("Score", VALID_SCORE[:-3], INVALID, "request:"),
    "truncated_in_the_middle": ("Score", VALID_SCORE[: len(VALID_SCORE) // 2], INVALID, "request:"),
    "garbage_score": ("Score", b"\xff\xfe\xfd\x00\x01" * 20, INVALID, "request:"),
    "overlong_varint": ("Score", b"\x08" + b"\xff" * 11, INVALID, "request:"),
    "invalid_utf8_request_id": ("Score", BAD_UTF8, INVALID, "request:"),
    "garbage_get_info": ("GetInfo", b"\xff\xff\xff", INVALID, "request:"),
    "garbage_fetch_head": ("FetchHead", b"\x08", INVALID, "request:"),
    "garbage_generate": ("Generate", b"\x12\x05\x0a", INVALID, "request:"),
    # generation
    "generate_zero_new_tokens": ("Generate", generate(max_new_tokens=0), INVALID, "max_new_tokens"),
    "generate_uint32_new_tokens": ("Generate", generate(max_new_tokens=UINT32_MAX), INVALID, "max_new_tokens"),
    "generate_nan_temperature": ("Generate", generate(temperature=math.nan), INVALID, "temperature"),
    "generate_infinite_temperature": ("Generate", generate(temperature=math.inf), INVALID, "temperature"),
    "generate_nan_top_p": ("Generate", generate(top_p=math.nan), INVALID, "top_p"),
    "generate_top_p_above_one": ("Generate", generate(top_p=1.5), INVALID, "top_p"),
    "generate_no_prompts": ("Generate", generate(prompts=pb.PackedTokens()), INVALID, "prompts.lengths"),
    "generate_prompt_id_out_of_range": (
        "Generate",
        generate(prompts=pack_sequences([[1, VOCAB + 5]])),
        INVALID,
        "prompts.ids",
    ),
    "generate_past_max_seq_len": (
        "Generate",
        generate(prompts=pack_sequences([[1] * 250]), max_new_tokens=10),
        INVALID,
        "prompts.lengths",
    ),
    # a request for another model
    "another_models_fingerprint": (
        "Score",
        edited(score(), lambda r: setattr(r, "expected_fingerprint", "0" * 32)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "expected_fingerprint",
    ),
}


def _bytes(request) -> bytes:
    return request if isinstance(request, bytes) else request.SerializeToString()


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_request_gets_the_right_status_and_a_one_line_message(servers, case):
    method, request, status, start = CASES[case]
    with _channel(servers["plain"].address) as channel, pytest.raises(grpc.RpcError) as info:
        _raw_call(channel, method, _bytes(request))
    assert info.value.code() == status, (info.value.code(), info.value.details())
    details = info.value.details() or ""
    assert "\n" not in details and details.startswith(start), details
    assert "Traceback" not in details and "Unexpected <class" not in details


TOKENLESS = [
    None,
    (("authorization", "Bearer wrong"),),
    (("authorization", TOKEN),),
    (("authorization", f"bearer {TOKEN}"),),
    (("authorization", f"Bearer {TOKEN} "),),
    (("authorization", ""),),
]
RPCS = {
    "GetInfo": pb.GetInfoRequest(),
    "FetchTokenizer": pb.FetchTokenizerRequest(),
    "FetchHead": pb.FetchHeadRequest(),
    "Score": score(),
    "Generate": generate(),
}


@pytest.mark.parametrize(
    "metadata", TOKENLESS, ids=["none", "wrong", "no_scheme", "lowercase_scheme", "trailing_space", "empty"]
)
@pytest.mark.parametrize("method", sorted(RPCS))
def test_every_method_without_the_right_token_is_unauthenticated(servers, method, metadata):
    with _channel(servers["auth"].address) as channel, pytest.raises(grpc.RpcError) as info:
        _raw_call(channel, method, RPCS[method].SerializeToString(), metadata)
    assert info.value.code() == UNAUTH and "\n" not in info.value.details()


def test_bad_bytes_without_a_token_learn_only_that_the_token_is_missing(servers):
    with _channel(servers["auth"].address) as channel, pytest.raises(grpc.RpcError) as info:
        _raw_call(channel, "Score", b"\xff\xfe\xfd")
    assert info.value.code() == UNAUTH


def test_after_the_whole_corpus_the_servers_are_healthy_and_answer(servers):
    plain = servers["plain"]
    with _channel(plain.address) as channel:
        for method, request, _, _ in CASES.values():  # the corpus again, back to back
            with pytest.raises(grpc.RpcError):
                _raw_call(channel, method, _bytes(request))
        parts = [pb.ScorePart.FromString(p) for p in channel.unary_stream(METHOD + "Score")(VALID_SCORE, timeout=60)]
        assert parts[0].WhichOneof("part") == "header" and parts[-1].WhichOneof("part") == "trailer"
        assert list(parts[0].header.rows_per_sequence) == [2, 1]
        reply = pb.GenerateResponse.FromString(
            channel.unary_unary(METHOD + "Generate")(generate().SerializeToString(), timeout=60)
        )
        assert list(reply.tokens.lengths) and 1 <= reply.tokens.lengths[0] <= 2
    with _channel(servers["auth"].address) as channel:
        info = pb.TeacherInfo.FromString(
            channel.unary_unary(METHOD + "GetInfo")(b"", timeout=30, metadata=(("authorization", f"Bearer {TOKEN}"),))
        )
        assert info.tokenizer_size == VOCAB
    for server in servers.values():
        assert server.process.poll() is None
        assert health_status(server.address) == health_pb2.HealthCheckResponse.SERVING
        assert "Traceback" not in server.log()
