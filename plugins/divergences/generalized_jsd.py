"""Generalised Jensen-Shannon divergence of GKD (Agarwal et al., 2024).

    GJSD_beta = beta KL(p_t || m) + (1 - beta) KL(p_s || m),   m = beta p_t + (1 - beta) p_s,
    p_s = softmax(z_s / tau),  p_t = softmax(z_t / tau)

`beta = 0.5` is the Jensen-Shannon divergence (`js`). At the end points the formula is identically 0
(m equals one of the two distributions and its weight vanishes), while GJSD_beta / beta tends to forward KL
as beta -> 0 and GJSD_beta / (1 - beta) to reverse KL as beta -> 1; like the GKD reference implementation
(TRL `generalized_jsd_loss`) we return those limits there: `beta = 0` gives forward KL, `beta = 1` reverse KL.
`log m` is a log-space mixture, exact without epsilons.

Shapes: `student_logits (N, V)`, `teacher_logits (N, V)` -> `(N,)` float32 (float64 for float64 input).
Entries where either logit is non-finite contribute 0 (spec §2, v2 masking; see `dskd.kit.probability`).

Options: `beta` in [0, 1], default 0.5.

Reference: GKD, "On-Policy Distillation of Language Models" (arXiv 2306.13649), eq. for JSD(beta).
"""

from __future__ import annotations

import torch

import dskd
from dskd.kit import check_unit_interval, fused_applies, fused_kl_rows, kl_terms, log_mixture, paired_logprobs


def generalized_jsd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0, beta: float = 0.5
) -> torch.Tensor:
    """Generalised JSD per row; see the module docstring."""
    check_unit_interval(beta, "beta", "generalized_jsd")
    if fused_applies(student_logits, teacher_logits):  # same values, closed-form student gradient (fewer passes)
        return fused_kl_rows(
            student_logits, teacher_logits, temperature=temperature, beta=beta, divergence="generalized_jsd"
        )
    pair = paired_logprobs(student_logits, teacher_logits, temperature=temperature, divergence="generalized_jsd")
    student, teacher = pair.safe()
    if beta == 0:
        return pair.masked_sum(kl_terms(teacher, student))
    if beta == 1:
        return pair.masked_sum(kl_terms(student, teacher))
    mixture = log_mixture(teacher, student, beta)
    return pair.masked_sum(beta * kl_terms(teacher, mixture) + (1 - beta) * kl_terms(student, mixture))


generalized_jsd.option_ranges = {"beta": (0.0, 1.0)}  # checked by `dskd validate`, before any model loads


@dskd.hookimpl
def dskd_register_divergences(register):
    register("generalized_jsd", generalized_jsd)
