"""The teacher row paired with each valid student row: what the cross-vocabulary logit baselines (`uld`,
`mined_kd`) need to run one chunked pass over every student token.

Those objectives compute the gold CE on every valid student token and a KD term on each token that has a
teacher partner (ULD) or on every token with a partner-or-substitute target (MinED). One pass over the
student rows does both, so each student row carries the index of its teacher row (0 where it has none) and a
`paired` flag. Everything is built with `index_copy`/`index_fill` from the packed pairs the data loader made
(`Batch.aligned_rows`), so no shape depends on device data and nothing synchronises with the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dskd.errors import ModelError
from dskd.types import Batch, TeacherSignal


@dataclass
class RowPartners:
    """For each of the `N_s` valid student rows: its teacher row and whether it has one."""

    teacher_index: torch.Tensor  # (N_s,) int64 into the teacher's valid rows; 0 where unpaired
    paired: torch.Tensor  # (N_s,) bool

    def teacher_rows(self, teacher_rows: torch.Tensor) -> torch.Tensor:
        """`(N_s, ...)`: each student row's partner out of the teacher's packed rows (zeros where unpaired).

        A batch whose teacher side has no valid row (nothing can be paired) gets zeros of the right shape,
        since index 0 does not exist there.
        """
        if teacher_rows.shape[0] == 0:
            return teacher_rows.new_zeros((self.paired.shape[0], *teacher_rows.shape[1:]))
        return teacher_rows.index_select(0, self.teacher_index)


def teacher_hidden(signal: TeacherSignal | None, hidden_size: int, name: str) -> torch.Tensor:
    """The teacher's hidden states of its valid rows, `(N_t, d_t)`, or a `ModelError` saying what is wrong."""
    if signal is None or signal.hidden_states is None:
        raise ModelError(f"objective {name} needs the teacher's hidden states, but the teacher sent none")
    hidden = signal.hidden_states
    if hidden.shape[-1] != hidden_size:
        raise ModelError(
            f"objective {name}: the teacher sent hidden states of size {hidden.shape[-1]} but its LM head expects "
            f"{hidden_size}; the server and its head do not belong together"
        )
    return hidden


def row_partners(batch: Batch, num_teacher_rows: int, *, same_vocab: bool, name: str, aligner_hint: str) -> RowPartners:
    """Partners from `batch.aligned_rows`; with one shared vocabulary and no alignment, row k pairs with row k.

    `num_teacher_rows` is the teacher's packed row count (a shape, known on the host).
    """
    num_student_rows = int(batch.student_rows.shape[0])
    device = batch.student_rows.device
    if batch.aligned_rows is None:
        if not same_vocab:
            raise ModelError(
                f"objective {name} with different vocabularies needs aligned rows in each batch; set "
                f'aligner.name = "{aligner_hint}" (or leave it empty to get that default)'
            )
        if num_student_rows != num_teacher_rows:
            raise ModelError(
                f"objective {name}: the vocabularies match but the batch has {num_student_rows} student and "
                f"{num_teacher_rows} teacher tokens (the tokenizers split the text differently); set "
                f'aligner.name = "{aligner_hint}" so the data loader pairs the tokens'
            )
        index = torch.arange(num_student_rows, device=device)
        return RowPartners(index, torch.ones(num_student_rows, dtype=torch.bool, device=device))
    pairs = batch.aligned_rows.to(device=device, dtype=torch.int64)
    index = torch.zeros(num_student_rows, dtype=torch.int64, device=device).index_copy(0, pairs[:, 1], pairs[:, 0])
    paired = torch.zeros(num_student_rows, dtype=torch.bool, device=device).index_fill(0, pairs[:, 1], True)
    return RowPartners(index, paired)
