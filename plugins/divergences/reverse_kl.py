"""Reverse KL divergence, KL(p_s || p_t) (MiniLLM, Gu et al., 2024).

    RKL = sum_v p_s,v (log p_s,v - log p_t,v),   p_s = softmax(z_s / tau),  p_t = softmax(z_t / tau)

Mode-seeking: the student concentrates on the teacher's high-probability tokens.

Shapes: `student_logits (N, V)`, `teacher_logits (N, V)` -> `(N,)` float32 (float64 for float64 input).
Entries where either logit is non-finite contribute 0 (spec §2, v2 masking; see `dskd.kit.probability`).

Sparse teacher: `teacher_logits` may be a `dskd.SparseTeacher` (top-k ids in the student vocabulary, their
log-probabilities and the tail log-mass). The divergence is then taken over k + 1 buckets: the k ids plus one
"rest" bucket holding the teacher's tail mass and the student's `1 - sum_k p_s`. Top-k log-probabilities
cannot be re-tempered exactly, so with a sparse teacher `temperature` must be 1 (the teacher server applies
any temperature); anything else raises `DivergenceError` (a `ValueError`).

Reference: spec §2 (`reverse_kl`); MiniLLM (arXiv 2306.08543).
"""

from __future__ import annotations

import torch

import dskd
from dskd import SparseTeacher
from dskd.kit import fused_applies, fused_kl_rows, kl_terms, paired_logprobs


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | SparseTeacher,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """KL(p_s || p_t) per row; see the module docstring."""
    if fused_applies(student_logits, teacher_logits):  # same values, closed-form student gradient (fewer passes)
        return fused_kl_rows(student_logits, teacher_logits, temperature=temperature, beta=1.0, divergence="reverse_kl")
    pair = paired_logprobs(
        student_logits, teacher_logits, temperature=temperature, divergence="reverse_kl", sparse_ok=True
    )
    student, teacher = pair.safe()
    return pair.masked_sum(kl_terms(student, teacher))


reverse_kl.accepts_sparse_teacher = True


@dskd.hookimpl
def dskd_register_divergences(register):
    register("reverse_kl", reverse_kl)
