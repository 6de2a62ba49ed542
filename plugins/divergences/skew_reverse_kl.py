"""Skew reverse KL divergence (DistiLLM, Ko et al., 2024).

    SRKL = sum_v p_s,v (log p_s,v - log q_v),   q = (1 - lam) p_t + lam p_s,
    p_s = softmax(z_s / tau),  p_t = softmax(z_t / tau)

Mixing some student mass into the teacher side bounds the loss (by -log lam) where the teacher puts almost
no mass on a student token. `lam = 0` is reverse KL; `lam = 1` is identically 0. `log q` is a log-space
mixture, so the reference's 0 * (-inf) = NaN on underflowed probabilities cannot happen (spec §14.13).

Shapes: `student_logits (N, V)`, `teacher_logits (N, V)` -> `(N,)` float32 (float64 for float64 input).
Entries where either logit is non-finite contribute 0 (spec §2, v2 masking; see `dskd.kit.probability`).

Options: `lam` in [0, 1], default 0.1 (the reference's `--skew-lambda`).

Reference: spec §2 (`skewed_reverse_kl`); DistiLLM (arXiv 2402.03898).
"""

from __future__ import annotations

import torch

import dskd
from dskd.kit import check_unit_interval, kl_terms, log_mixture, paired_logprobs


def skew_reverse_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0, lam: float = 0.1
) -> torch.Tensor:
    """Skew reverse KL per row; see the module docstring."""
    check_unit_interval(lam, "lam", "skew_reverse_kl")
    pair = paired_logprobs(student_logits, teacher_logits, temperature=temperature, divergence="skew_reverse_kl")
    student, teacher = pair.safe()
    return pair.masked_sum(kl_terms(student, log_mixture(student, teacher, lam)))


skew_reverse_kl.option_ranges = {"lam": (0.0, 1.0)}  # checked by `dskd validate`, before any model loads


@dskd.hookimpl
def dskd_register_divergences(register):
    register("skew_reverse_kl", skew_reverse_kl)
