"""What the objective tests share: running a micro-batch as the engine does, and float64 reference maths.

The reference maths here (log-softmax, KL, the two KL divergences) is written from the formulas, in float64,
and shares no code with `dskd`: it is the oracle the chunked float32 losses are compared with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dskd.kit.lm_head import last_hidden_state
from dskd.kit.weights import objective_loss
from dskd.types import Batch, LossTerms


@dataclass
class Result:
    """A micro-batch's weighted loss (what the engine back-propagates) and the objective's unweighted terms."""

    loss: torch.Tensor
    terms: LossTerms

    @property
    def sums(self) -> dict[str, torch.Tensor]:
        return self.terms.sums

    @property
    def counts(self) -> dict[str, torch.Tensor]:
        return self.terms.counts


def run_objective(
    objective, student, teacher, batch: Batch, denominator: float, *, kd_rate: float, weights=None
) -> Result:
    """One micro-batch as the engine runs it: student hidden states, teacher signal for the valid rows, the
    objective's terms, weighted by `kd_rate` over `denominator` (or by explicit `LossWeights`)."""
    hidden = last_hidden_state(student, batch.student_input_ids, batch.student_attention_mask)
    signal = teacher.score(batch.teacher_input_ids, batch.teacher_attention_mask, batch.teacher_rows, objective.request)
    return Result(
        *objective_loss(objective, batch, hidden, signal, kd_rate=kd_rate, denominator=denominator, weights=weights)
    )


def log_softmax64(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    z = logits.double() / temperature
    shifted = z - z.max(-1, keepdim=True).values.detach()
    return shifted - torch.log(torch.exp(shifted).sum(-1, keepdim=True))


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p || q) per row, from logits, float64."""
    log_p, log_q = log_softmax64(p_logits, temperature), log_softmax64(q_logits, temperature)
    return (torch.exp(log_p) * (log_p - log_q)).sum(-1)


def divergence_oracle(name: str, student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    """Per-row `forward_kl` (KL(p_t || p_s)) or `reverse_kl` (KL(p_s || p_t))."""
    if name == "forward_kl":
        return kl(teacher_logits, student_logits, temperature)
    if name == "reverse_kl":
        return kl(student_logits, teacher_logits, temperature)
    raise AssertionError(f"no oracle for divergence {name!r}")


def gradients(params: dict[str, torch.nn.Parameter], loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """d loss / d each parameter (zeros where unused), leaving `.grad` clear."""
    for p in params.values():
        p.grad = None
    loss.backward()
    out = {name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for name, p in params.items()}
    for p in params.values():
        p.grad = None
    return out


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5, what: str = "") -> None:
    """max |actual - expected| <= tol * max |expected| (relative to the tensor's scale, not per element)."""
    scale = expected.detach().abs().max().double().clamp_min(1e-30)
    err = float((actual.detach().double() - expected.detach().double()).abs().max() / scale)
    assert err <= tol, f"{what}: relative difference {err:.3e} > {tol:.0e}"
