"""Cross-model attention between a student sequence and a teacher sequence (DSKD-CMA, spec §8.1).

Each sequence of a micro-batch attends only to its own counterpart: scores are `(B, T_s, T_t)` in float32
(8 x 512 x 512 = 2M floats at the reference's sizes, small next to any logits), so the rows packed by the
data loader are put back into the padded layout for the attention and taken out again afterwards, with
`index_copy`/`index_select` on the host-made row indices (no data-dependent shape, no host sync).

Masking: a student position i and a teacher position j interact only when both carry a label (prompt and
padding carry none). Masked scores are filled with the most negative float rather than the reference's
additive -1e5, so a masked pair gets exactly zero weight whatever the scores' scale, and a row with nothing
to attend to (a sequence whose other side has no label) is a finite uniform row that its caller discards.
"""

from __future__ import annotations

import math

import torch


def padded(rows: torch.Tensor, index: torch.Tensor, batch_size: int, length: int) -> torch.Tensor:
    """`(B, T, d)` with packed `rows (N, d)` at flat positions `index` (b * T + t) and zeros elsewhere."""
    out = rows.new_zeros((batch_size * length, rows.shape[-1]))
    return out.index_copy(0, index, rows).view(batch_size, length, rows.shape[-1])


def packed(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`(N, d)` rows of `(B, T, d)` values at flat positions `index`."""
    return values.reshape(-1, values.shape[-1]).index_select(0, index)


def attention_weights(
    query: torch.Tensor, key: torch.Tensor, student_mask: torch.Tensor, teacher_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both directions of the attention, float32.

    `query (B, T_s, k)`, `key (B, T_t, k)`; masks `(B, T_s)` and `(B, T_t)` bool (true = has a label).
    Returns `t2s (B, T_s, T_t)`: softmax over teacher positions of `Q K^T / sqrt(k)` (each student position
    gathers teacher values), and `s2t (B, T_t, T_s)`: softmax over student positions of the transposed scores.
    """
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) / math.sqrt(query.shape[-1])
    allowed = student_mask[:, :, None] & teacher_mask[:, None, :]
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1), torch.softmax(scores.transpose(-1, -2), dim=-1)


def sequence_has(mask: torch.Tensor, index: torch.Tensor, length: int) -> torch.Tensor:
    """`(N,)` bool: does the sequence of each flat position in `index` have any true entry in `mask (B, T')`.

    Used to drop rows whose counterpart sequence has no label (nothing to attend to); `length` is the width
    of the layout `index` refers to.
    """
    return mask.any(dim=1).index_select(0, torch.div(index, length, rounding_mode="floor"))
