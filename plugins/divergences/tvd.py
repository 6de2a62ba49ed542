"""Total variation distance between teacher and student.

    TVD = 1/2 sum_v |p_t,v - p_s,v|,   p_s = softmax(z_s / tau),  p_t = softmax(z_t / tau)

Bounded in [0, 1]; symmetric. Neither reference repository implements it; this is the definition the spec
fixes for it (spec §2). Where p_t,v = p_s,v the subgradient used is 0.

Shapes: `student_logits (N, V)`, `teacher_logits (N, V)` -> `(N,)` float32 (float64 for float64 input).
Entries where either logit is non-finite contribute 0 (spec §2, v2 masking; see `dskd.kit.probability`).

Reference: spec §2 ("If we add TVD, define it as 1/2 sum_v |p_t,v - p_s,v|").
"""

from __future__ import annotations

import torch

import dskd
from dskd.kit import paired_logprobs


def tvd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Total variation distance per row; see the module docstring."""
    pair = paired_logprobs(student_logits, teacher_logits, temperature=temperature, divergence="tvd")
    student, teacher = pair.safe()
    return 0.5 * pair.masked_sum((teacher.exp() - student.exp()).abs())


@dskd.hookimpl
def dskd_register_divergences(register):
    register("tvd", tvd)
