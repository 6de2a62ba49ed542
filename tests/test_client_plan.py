"""Packing a padded batch into Score requests, and decoded answers back into the caller's row order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dskd.errors import TeacherError
from dskd.protos import teacher_pb2 as pb
from dskd.servers.score_plan import (
    RequestLimits,
    assemble_signal,
    empty_signal,
    plan_score,
)
from dskd.servers.wire import int32_array
from dskd.types import SignalRequest

LIMITS = RequestLimits(
    vocab_size=50, hidden_size=4, max_seq_len=8, max_batch_tokens=64, max_top_k=8, max_response_bytes=1 << 20
)
TOPK = SignalRequest(top_k=3)


def batch():
    ids = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 8, 9, 10], [11, 12, 13, 14, 15]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # right-, left- and unpadded
    return ids, mask


def unpack(message: pb.ScoreRequest):
    ids = int32_array(message.tokens.ids).tolist()
    positions = int32_array(message.positions).tolist()
    return ids, list(message.tokens.lengths), positions, list(message.position_counts)


def test_padded_batch_is_packed_without_padding_and_rows_become_positions():
    ids, mask = batch()
    rows = torch.tensor([0, 2, 7, 9, 10, 14])  # (0,0) (0,2) (1,2) (1,4) (2,0) (2,4)
    plan = plan_score(ids, mask, rows, TOPK, LIMITS, pb.BF16)
    (message,) = plan.messages
    assert unpack(message) == ([5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [3, 3, 5], [0, 2, 0, 2, 0, 4], [2, 2, 2])
    assert message.outputs.top_k == 3 and message.outputs.wire_dtype == pb.BF16
    assert plan.order is None
    assert plan.rows_per_sequence.tolist() == [2, 2, 2]


def test_sequences_without_rows_are_not_sent():
    ids, mask = batch()
    plan = plan_score(ids, mask, torch.tensor([12]), TOPK, LIMITS, pb.BF16)
    (message,) = plan.messages
    assert unpack(message) == ([11, 12, 13, 14, 15], [5], [2], [1])
    assert plan.rows_per_sequence.tolist() == [0, 0, 1]


def test_rows_out_of_sequence_order_are_sorted_for_the_wire_and_restored_after():
    ids, mask = batch()
    rows = torch.tensor([14, 0, 9, 2])
    plan = plan_score(ids, mask, rows, SignalRequest(hidden_states=True), LIMITS, pb.FP32)
    (message,) = plan.messages
    assert unpack(message)[2:] == ([0, 2, 2, 4], [2, 1, 1])
    # The server answers in wire order: fake that answer with each row's wire position as its value.
    wire_rows = torch.arange(4, dtype=torch.float32).unsqueeze(1).repeat(1, 4)
    signal = assemble_signal(plan, [{"hidden_states": wire_rows}], "cpu")
    # Caller row i was sent as wire row order^-1(i): rows 14,0,9,2 -> wire positions 3,0,2,1.
    assert signal.hidden_states[:, 0].tolist() == [3.0, 0.0, 2.0, 1.0]
    assert signal.rows_per_sequence.tolist() == [2, 1, 1]


def test_assembled_signal_has_the_teacher_interface_dtypes():
    ids, mask = batch()
    plan = plan_score(
        ids, mask, torch.tensor([0, 1]), SignalRequest(hidden_states=True, top_k=2, logits=True), LIMITS, pb.BF16
    )
    part = {
        "hidden_states": torch.ones(2, 4, dtype=torch.bfloat16),
        "topk_ids": torch.ones(2, 2, dtype=torch.int32),
        "topk_logprobs": torch.ones(2, 2, dtype=torch.bfloat16),
        "tail_logmass": torch.ones(2),
        "logits": torch.ones(2, 50, dtype=torch.bfloat16),
    }
    signal = assemble_signal(plan, [part], "cpu")
    assert signal.hidden_states.dtype == torch.float32 and signal.logits.dtype == torch.float32
    assert signal.topk_ids.dtype == torch.int64 and signal.topk_logprobs.dtype == torch.float32


def test_batch_above_the_token_budget_is_split_into_whole_sequences():
    limits = RequestLimits(
        vocab_size=50, hidden_size=4, max_seq_len=8, max_batch_tokens=16, max_top_k=8, max_response_bytes=1 << 20
    )
    ids = torch.arange(40).reshape(5, 8) % 50
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    rows = torch.arange(40)[mask.reshape(-1).bool()]
    plan = plan_score(ids, mask, rows, TOPK, limits, pb.BF16)
    assert len(plan.messages) == 3
    seen_ids, seen_positions = [], []
    for message in plan.messages:
        got_ids, lengths, positions, counts = unpack(message)
        assert len(lengths) * max(lengths) <= 16
        seen_ids += got_ids
        seen_positions += positions
        assert sum(counts) == len(positions)
    assert seen_ids == ids[mask.bool()].tolist()
    assert len(seen_positions) == rows.numel()


def test_batch_above_the_response_limit_is_split():
    limits = RequestLimits(
        vocab_size=50, hidden_size=4, max_seq_len=8, max_batch_tokens=64, max_top_k=8, max_response_bytes=8 * 100
    )
    ids = torch.arange(24).reshape(3, 8)
    request = SignalRequest(logits=True)  # 100 bytes a row in bf16
    plan = plan_score(ids, torch.ones_like(ids), torch.arange(24), request, limits, pb.BF16)
    assert [len(m.position_counts) for m in plan.messages] == [1, 1, 1]


def test_attention_mask_with_holes_is_refused():
    ids, mask = batch()
    mask[2, 2] = 0
    with pytest.raises(TeacherError, match="row 2 has holes"):
        plan_score(ids, mask, torch.tensor([10]), TOPK, LIMITS, pb.BF16)


def test_row_on_padding_is_refused():
    ids, mask = batch()
    with pytest.raises(TeacherError, match="row 4 points at padding"):
        plan_score(ids, mask, torch.tensor([4]), TOPK, LIMITS, pb.BF16)
    with pytest.raises(TeacherError, match="row 5 points at padding"):
        plan_score(ids, mask, torch.tensor([5]), TOPK, LIMITS, pb.BF16)


def test_rows_outside_the_batch_are_refused():
    ids, mask = batch()
    with pytest.raises(TeacherError, match=r"\[0, 15\)"):
        plan_score(ids, mask, torch.tensor([15]), TOPK, LIMITS, pb.BF16)


def test_ids_outside_the_teachers_vocabulary_are_refused():
    ids, mask = batch()
    ids[0, 0] = 50
    with pytest.raises(TeacherError, match="token id 50 is outside"):
        plan_score(ids, mask, torch.tensor([1]), TOPK, LIMITS, pb.BF16)


def test_sequence_longer_than_the_servers_limit_is_refused():
    ids = torch.zeros(1, 9, dtype=torch.int64)
    with pytest.raises(TeacherError, match="max_seq_len 8"):
        plan_score(ids, torch.ones_like(ids), torch.tensor([0]), TOPK, LIMITS, pb.BF16)


def test_top_k_above_the_servers_limit_is_refused():
    ids, mask = batch()
    with pytest.raises(TeacherError, match="max_top_k 8"):
        plan_score(ids, mask, torch.tensor([0]), SignalRequest(top_k=9), LIMITS, pb.BF16)


def test_empty_request_is_refused():
    ids, mask = batch()
    with pytest.raises(TeacherError, match="asks for nothing"):
        plan_score(ids, mask, torch.tensor([0]), SignalRequest(), LIMITS, pb.BF16)


def test_no_rows_needs_no_call_and_gives_empty_tensors():
    ids, mask = batch()
    plan = plan_score(
        ids, mask, torch.zeros(0, dtype=torch.int64), SignalRequest(hidden_states=True, top_k=3), LIMITS, pb.BF16
    )
    assert plan.messages == []
    signal = empty_signal(plan, LIMITS, "cpu")
    assert (
        signal.hidden_states.shape == (0, 4) and signal.topk_ids.shape == (0, 3) and signal.tail_logmass.shape == (0,)
    )
    assert signal.rows_per_sequence.tolist() == [0, 0, 0]


def test_packing_matches_a_per_sequence_loop_on_random_batches():
    rng = np.random.default_rng(3)
    for _ in range(20):
        b, t = rng.integers(1, 6), rng.integers(1, 8)
        lengths = rng.integers(0, t + 1, b)
        left = rng.random(b) < 0.5
        ids = torch.tensor(rng.integers(0, 50, (b, t)))
        mask = torch.zeros(b, t, dtype=torch.int64)
        for i in range(b):
            start = t - lengths[i] if left[i] else 0
            mask[i, start : start + lengths[i]] = 1
        valid = torch.nonzero(mask.reshape(-1)).reshape(-1)
        rows = valid[torch.tensor(rng.permutation(valid.numel()))][: rng.integers(0, valid.numel() + 1)]
        plan = plan_score(ids, mask, rows, TOPK, LIMITS, pb.BF16)
        expected_pos = {}
        for r in rows.tolist():
            i, p = divmod(r, t)
            expected_pos.setdefault(i, []).append(p - int(torch.nonzero(mask[i])[0]))
        sent_ids, sent_positions = [], []
        for message in plan.messages:
            got_ids, _, positions, _ = unpack(message)
            sent_ids += got_ids
            sent_positions += positions
        expected_ids = [tok for i in sorted(expected_pos) for tok in ids[i][mask[i].bool()].tolist()]
        assert sent_ids == expected_ids
        assert sent_positions == [p for i in sorted(expected_pos) for p in expected_pos[i]]
