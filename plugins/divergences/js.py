"""Jensen-Shannon divergence between teacher and student.

    JS = 1/2 KL(p_t || m) + 1/2 KL(p_s || m),   m = (p_s + p_t) / 2,
    p_s = softmax(z_s / tau),  p_t = softmax(z_t / tau)

`log m` is `logaddexp(log p_s, log p_t) - log 2`, exact without the reference's `1e-9` epsilons (spec §2),
which bias the value for tokens with probability near 1e-9. Bounded by log 2; symmetric.

Shapes: `student_logits (N, V)`, `teacher_logits (N, V)` -> `(N,)` float32 (float64 for float64 input).
Entries where either logit is non-finite contribute 0 (spec §2, v2 masking; see `dskd.kit.probability`).

Reference: spec §2 (`js_divergence`); Lin (1991), "Divergence measures based on the Shannon entropy".
`generalized_jsd` with `beta=0.5` gives the same value.
"""

from __future__ import annotations

import torch

import dskd
from dskd.kit import fused_applies, fused_kl_rows, kl_terms, log_mixture, paired_logprobs


def js(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Jensen-Shannon divergence per row; see the module docstring."""
    if fused_applies(student_logits, teacher_logits):  # same values, closed-form student gradient (fewer passes)
        return fused_kl_rows(student_logits, teacher_logits, temperature=temperature, beta=0.5, divergence="js")
    pair = paired_logprobs(student_logits, teacher_logits, temperature=temperature, divergence="js")
    student, teacher = pair.safe()
    mixture = log_mixture(teacher, student, 0.5)
    return pair.masked_sum(0.5 * kl_terms(teacher, mixture) + 0.5 * kl_terms(student, mixture))


@dskd.hookimpl
def dskd_register_divergences(register):
    register("js", js)
