"""Request validation: every malformed Score or Generate request is refused with a message naming its field."""

from __future__ import annotations

import numpy as np
import pytest

from dskd.protos import teacher_pb2 as pb
from dskd.servers.validation import (
    RequestError,
    ServerLimits,
    response_bytes,
    validate_generate,
    validate_score,
)
from dskd.servers.wire import int32_bytes, pack_sequences
from dskd.types import SignalRequest

LIMITS = ServerLimits(
    vocab_size=100,
    hidden_size=8,
    max_seq_len=16,
    max_batch_tokens=32,
    max_top_k=10,
    max_response_bytes=4000,
    max_new_tokens=8,
)


def score_request(sequences=([1, 2, 3], [4, 5]), positions=([0, 2], [1]), **outputs) -> pb.ScoreRequest:
    outputs = {"hidden_states": True, "top_k": 4, **outputs}
    return pb.ScoreRequest(
        tokens=pack_sequences([list(s) for s in sequences]),
        positions=int32_bytes(np.array([p for ps in positions for p in ps], dtype=np.int64)),
        position_counts=[len(p) for p in positions],
        outputs=pb.OutputSpec(**outputs),
    )


def test_valid_request_becomes_native_arrays():
    checked = validate_score(score_request(), LIMITS)
    assert checked.tokens.ids.tolist() == [1, 2, 3, 4, 5]
    assert checked.tokens.lengths.tolist() == [3, 2]
    assert checked.positions.tolist() == [0, 2, 1]
    assert checked.counts.tolist() == [2, 1]
    assert checked.request == SignalRequest(hidden_states=True, top_k=4)
    assert checked.wire_dtype == pb.BF16  # unspecified means the default
    assert checked.padded_tokens == 6


def _refused(request, field):
    with pytest.raises(RequestError) as info:
        validate_score(request, LIMITS)
    assert info.value.field == field
    assert str(info.value).startswith(field + ":")
    return str(info.value)


def test_id_outside_vocabulary_is_refused():
    assert "outside the teacher's vocabulary" in _refused(score_request(sequences=([1, 100, 3], [4, 5])), "tokens.ids")


def test_negative_id_is_refused():
    _refused(score_request(sequences=([1, -1, 3], [4, 5])), "tokens.ids")


def test_sequence_longer_than_max_seq_len_is_refused():
    assert "max_seq_len 16" in _refused(score_request(sequences=(list(range(17)), [4, 5])), "tokens.lengths")


def test_empty_batch_is_refused():
    _refused(pb.ScoreRequest(outputs=pb.OutputSpec(top_k=2)), "tokens.lengths")


def test_zero_length_sequence_is_refused():
    request = score_request()
    request.tokens.lengths[1] = 0
    _refused(request, "tokens.lengths")


def test_ids_bytes_that_disagree_with_lengths_are_refused():
    request = score_request()
    request.tokens.ids = request.tokens.ids[:-4]
    _refused(request, "tokens.ids")


def test_position_beyond_its_sequence_is_refused():
    message = _refused(score_request(positions=([0, 3], [1])), "positions")
    assert "sequence 0" in message


def test_negative_position_is_refused():
    _refused(score_request(positions=([0], [-1])), "positions")


def test_position_counts_must_match_sequences():
    request = score_request()
    del request.position_counts[1]
    _refused(request, "position_counts")


def test_positions_bytes_must_match_counts():
    request = score_request()
    request.positions = request.positions[:-4]
    _refused(request, "positions")


def test_top_k_above_limit_is_refused():
    _refused(score_request(top_k=11), "outputs.top_k")


def test_top_k_above_vocabulary_is_refused():
    limits = ServerLimits(vocab_size=5, hidden_size=8, max_top_k=64)
    with pytest.raises(RequestError, match="outputs.top_k"):
        validate_score(score_request(sequences=([1, 2], [3]), positions=([0], [0]), top_k=6), limits)


def test_unknown_wire_dtype_is_refused():
    _refused(score_request(wire_dtype=9), "outputs.wire_dtype")


def test_integer_wire_dtype_is_refused():
    _refused(score_request(wire_dtype=pb.INT32), "outputs.wire_dtype")


def test_request_for_nothing_is_refused():
    _refused(score_request(hidden_states=False, top_k=0), "outputs")


def test_batch_above_token_budget_is_refused():
    assert "split the batch" in _refused(
        score_request(sequences=([1] * 16, [2] * 16, [3]), positions=([0], [0], [0])), "tokens"
    )


def test_response_above_size_limit_is_refused():
    # 3 rows of 100 bf16 logits = 600 bytes fit; make the limit bite with many rows of logits.
    seqs = ([1] * 10, [2] * 10, [3] * 10)
    request = score_request(sequences=seqs, positions=(list(range(10)),) * 3, hidden_states=False, top_k=0, logits=True)
    assert "max_response_bytes" in _refused(request, "outputs")


def test_response_size_counts_every_requested_tensor():
    request = SignalRequest(hidden_states=True, top_k=4, logits=True)
    # per row: hidden 8*2, top-k 4*(4+2) + tail 4, logits 100*2
    assert response_bytes(3, request, pb.BF16, LIMITS) == 3 * (16 + 28 + 200)
    assert response_bytes(3, request, pb.FP32, LIMITS) == 3 * (32 + 36 + 400)


def generate_request(**overrides) -> pb.GenerateRequest:
    fields = {
        "prompts": pack_sequences([[1, 2], [3]]),
        "max_new_tokens": 4,
        "temperature": 1.0,
        "top_p": 0.9,
        "seed": 3,
        **overrides,
    }
    return pb.GenerateRequest(**fields)


def test_valid_generate_request_unpacks_prompts():
    checked = validate_generate(generate_request(), LIMITS)
    assert checked.prompts == [[1, 2], [3]]
    assert (checked.max_new_tokens, checked.seed) == (4, 3)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 9}, "max_new_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": -0.1}, "top_p"),  # 0 is proto3 for unset: no nucleus filter
        ({"top_p": 1.5}, "top_p"),
        ({"prompts": pack_sequences([[1, 100]])}, "prompts.ids"),
        ({"prompts": pack_sequences([list(range(13))])}, "prompts.lengths"),  # 13 + 4 new > max_seq_len 16
        ({"prompts": pb.PackedTokens()}, "prompts.lengths"),
    ],
)
def test_bad_generate_request_is_refused_naming_the_field(overrides, field):
    with pytest.raises(RequestError) as info:
        validate_generate(generate_request(**overrides), LIMITS)
    assert info.value.field == field
