"""The stored form of a teacher signal, checked against closed forms: bytes per row, int8 error, exact narrowing of
stored top-k entries, and sequence keys that do not depend on how the ids are held."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dskd.models.teacher import topk_with_tail
from dskd.store.encoding import decode_hidden, encode_rows, narrow_topk, row_bytes, sequence_key
from dskd.types import TeacherSignal


def test_bytes_per_row_meet_the_layout_targets():
    assert row_bytes("hidden", "bfloat16", 4096, 0, 152064) == 2 * 4096
    assert row_bytes("hidden", "int8", 4096, 0, 152064) == 4096 + 4
    assert row_bytes("topk", "float16", 0, 64, 32000) == 64 * 2 + 64 * 2 + 4  # uint16 ids
    assert row_bytes("topk", "float16", 0, 64, 152064) == 64 * 4 + 64 * 2 + 4 <= 400  # int32 ids past 65,536


def test_int8_rows_are_within_half_a_step_of_their_scale_and_zero_rows_stay_zero():
    hidden = torch.randn(50, 96, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 50).unsqueeze(1)
    hidden[7] = 0.0
    stored = encode_rows("hidden", "int8", TeacherSignal(torch.tensor([50]), hidden_states=hidden), 100)
    assert stored["hidden_q"].dtype == torch.int8 and stored["hidden_scale"].dtype == torch.float32
    restored = decode_hidden(stored)
    step = hidden.abs().amax(dim=1, keepdim=True) / 127
    assert torch.all((restored - hidden).abs() <= step / 2 * (1 + 1e-6))
    assert torch.equal(restored[7], torch.zeros(96))


@pytest.mark.parametrize("k", [1, 5, 16])
def test_narrowing_stored_top_k_equals_cutting_the_dense_distribution_at_k(k):
    logits = torch.randn(30, 200, generator=torch.Generator().manual_seed(k), dtype=torch.float64).float() * 3
    ids, logprobs, tail = topk_with_tail(logits, 16)
    narrowed = narrow_topk(ids, logprobs, tail, k)
    expected = topk_with_tail(logits, k)
    assert torch.equal(narrowed[0], expected[0])
    assert torch.allclose(narrowed[1], expected[1])
    assert torch.allclose(narrowed[2], expected[2], atol=1e-5)
    # the mass is conserved: top-k probabilities plus the tail sum to one
    total = narrowed[1].exp().sum(dim=1) + narrowed[2].exp()
    assert torch.allclose(total, torch.ones(30), atol=1e-5)


def test_a_sequence_key_depends_on_the_ids_only():
    ids = [1, 415, 29871, 13, 2]
    assert sequence_key(ids) == sequence_key(np.asarray(ids, dtype=np.int32)) == sequence_key(torch.tensor(ids))
    assert sequence_key(ids) != sequence_key(ids[:-1]) != sequence_key([1, 415, 29871, 14, 2])
