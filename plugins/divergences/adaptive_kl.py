"""Adaptive KL (AKL, Wu et al., 2024): forward and reverse KL weighted by where the student errs.

    p_s = softmax(z_s / tau),  p_t = softmax(z_t / tau),  gap_v = |p_t,v - p_s,v|
    sort p_t ascending (stable: ties keep vocabulary order); c = cumulative sum of the sorted p_t
    tail = {v : c_v <= mu}   (inclusive; the token whose c crosses mu is in the head, as is every later one)
    g_head = sum_{v in head} gap_v,  g_tail = sum_{v in tail} gap_v   (both detached)
    AKL = g_head / (g_head + g_tail) FKL + g_tail / (g_head + g_tail) RKL

Forward KL fits the teacher's head, reverse KL its tail; AKL weights each by the student's error there.
This is spec §2.1 exactly, with two documented choices:
- **deviation:** when g_head + g_tail = 0 (identical distributions) the reference divides 0 by 0 and returns
  NaN; here the sum of the gaps is clamped to the smallest positive float, so both weights are 0 and AKL is 0.
- gaps at entries where either logit is non-finite are 0, like every other masked term; the teacher's own
  probabilities (0 at its `-inf` entries) still decide the sort and the cumulative mass.
Cost: one full-vocabulary sort per row.

Shapes: `student_logits (N, V)`, `teacher_logits (N, V)` -> `(N,)` float32 (float64 for float64 input).

Options: `mu` in [0, 1], default 0.5 (the reference's `--adaptive-kl-alpha`).

Reference: spec §2.1; "Rethinking Kullback-Leibler Divergence in Knowledge Distillation for Large Language
Models" (arXiv 2404.02657).
"""

from __future__ import annotations

import torch

import dskd
from dskd.kit import check_unit_interval, kl_terms, paired_logprobs


def adaptive_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0, mu: float = 0.5
) -> torch.Tensor:
    """Adaptive KL per row; see the module docstring."""
    check_unit_interval(mu, "mu", "adaptive_kl")
    pair = paired_logprobs(student_logits, teacher_logits, temperature=temperature, divergence="adaptive_kl")
    student, teacher = pair.safe()
    with torch.no_grad():
        # True teacher probabilities (0 where its logit is -inf), not the masked "safe" ones.
        teacher_probs = torch.nan_to_num(pair.teacher.exp(), nan=0.0)
        gap = torch.where(pair.mask, (teacher.exp() - student.exp()).abs(), torch.zeros_like(teacher))
        sorted_probs, order = torch.sort(teacher_probs, dim=-1, stable=True)
        tail = torch.cumsum(sorted_probs, dim=-1) <= mu
        sorted_gap = gap.gather(-1, order)
        g_tail = (sorted_gap * tail).sum(-1)
        g_head = (sorted_gap * ~tail).sum(-1)  # summed, not total - g_tail, which can round below 0
        gaps = (g_head + g_tail).clamp_min(torch.finfo(gap.dtype).tiny)
    fkl = pair.masked_sum(kl_terms(teacher, student))
    rkl = pair.masked_sum(kl_terms(student, teacher))
    return g_head / gaps * fkl + g_tail / gaps * rkl


adaptive_kl.option_ranges = {"mu": (0.0, 1.0)}  # checked by `dskd validate`, before any model loads


@dskd.hookimpl
def dskd_register_divergences(register):
    register("adaptive_kl", adaptive_kl)
