"""The squared Hellinger distance as a dskd divergence.

`H^2(p_t, p_s) = 1 - sum_v sqrt(p_t,v * p_s,v)`, in [0, 1], symmetric, and zero exactly when the two
distributions are equal. It follows the divergence contract: two `(N, V)` logit tensors (student first),
a keyword-only `temperature` that divides both, options as keyword parameters with defaults, and a float32
`(N,)` result.
"""

from __future__ import annotations

import torch

import dskd


def hellinger(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    log_p_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    # sqrt(p_t p_s) = exp((log p_t + log p_s) / 2); a -inf entry on either side contributes exactly 0.
    overlap = torch.exp(0.5 * (log_p_s + log_p_t)).sum(dim=-1)
    return (1.0 - overlap).clamp_min(0.0)


@dskd.hookimpl
def dskd_register_divergences(register) -> None:
    register("hellinger", hellinger)
