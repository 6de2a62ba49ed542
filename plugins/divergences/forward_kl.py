"""Forward KL divergence, KL(p_t || p_s): the classic distillation loss (Hinton et al., 2015).

    FKL = sum_v p_t,v (log p_t,v - log p_s,v),   p_s = softmax(z_s / tau),  p_t = softmax(z_t / tau)

Mean-seeking: the student is pushed to cover every token the teacher gives mass to.

Shapes: `student_logits (N, V)`, `teacher_logits (N, V)` -> `(N,)` float32 (float64 for float64 input).
Entries where either logit is non-finite contribute 0 (spec §2, v2 masking; see `dskd.kit.probability`).

Sparse teacher: `teacher_logits` may be a `dskd.SparseTeacher` (top-k ids in the student vocabulary, their
log-probabilities and the tail log-mass). The divergence is then taken over k + 1 buckets: the k ids plus one
"rest" bucket holding the teacher's tail mass and the student's `1 - sum_k p_s`. Top-k log-probabilities
cannot be re-tempered exactly, so with a sparse teacher `temperature` must be 1 (the teacher server applies
any temperature); anything else raises `DivergenceError` (a `ValueError`).

Reference: spec §2 (`forward_kl`); DSKD (Zhang et al., 2024, arXiv 2406.17328).
"""

from __future__ import annotations

import torch

import dskd
from dskd import SparseTeacher
from dskd.kit import fused_applies, fused_kl_rows, kl_terms, paired_logprobs


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | SparseTeacher,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """KL(p_t || p_s) per row; see the module docstring."""
    if fused_applies(student_logits, teacher_logits):  # same values, closed-form student gradient (fewer passes)
        return fused_kl_rows(student_logits, teacher_logits, temperature=temperature, beta=0.0, divergence="forward_kl")
    pair = paired_logprobs(
        student_logits, teacher_logits, temperature=temperature, divergence="forward_kl", sparse_ok=True
    )
    student, teacher = pair.safe()
    return pair.masked_sum(kl_terms(teacher, student))


forward_kl.accepts_sparse_teacher = True


@dskd.hookimpl
def dskd_register_divergences(register):
    register("forward_kl", forward_kl)
