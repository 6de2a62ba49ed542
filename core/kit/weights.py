"""How an objective's loss parts become the step's loss: the engine's weighting, in one place (spec §0, §1.3).

An objective returns unweighted sums (`LossTerms.parts`). The engine weights them: the gold CE by
`(1 - kd_rate) * ce_scale`, every distillation part by `kd_rate * kd_scale`, the whole divided by `D`, where the
scales are those of a policy's split step and `D` is the step's global loss denominator. `LossWeights` holds
these numbers; `Weighing.loss` applies them.

Chunked losses (`dskd.kit.chunked_parts`) take each chunk's gradients while its logits exist, so the weights
must be known before the objective runs. The engine therefore makes them current around `compute`
(`with weighting(weights) as weighing:`); a chunked computation reads them there, computes the weighted loss
of its parts with their gradients, hands that loss to the weighing, and returns the parts' plain values.
Nowhere does an objective see a weight. Outside the engine no weights are current: every part counts once and
the parts themselves are differentiable (`chunked_parts`), as a researcher comparing losses expects.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

CE = "ce"
"""The name of the gold cross-entropy part; every other part of `LossTerms.parts` is a distillation part."""


@dataclass(frozen=True)
class LossWeights:
    """The weights of one micro-batch: `(ce * CE + kd * sum of distillation parts) / denominator`."""

    ce: float = 1.0
    kd: float = 1.0
    denominator: float = 1.0

    @classmethod
    def for_batch(
        cls, *, kd_rate: float, denominator: float = 1.0, ce_scale: float = 1.0, kd_scale: float = 1.0
    ) -> "LossWeights":
        """`(1 - kd_rate) * ce_scale` and `kd_rate * kd_scale` over `D` (spec §1.3 and §0)."""
        return cls(ce=(1.0 - kd_rate) * ce_scale, kd=kd_rate * kd_scale, denominator=denominator)

    def of(self, part: str) -> float:
        return self.ce if part == CE else self.kd

    def combine(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """`(ce * CE + kd * (p1 + p2 + ...)) / D` over `parts`, in their order; a role without parts is left out
        (not multiplied by zero: a NaN there must not leak into the other role)."""
        ce = [value for name, value in parts.items() if name == CE]
        kd = [value for name, value in parts.items() if name != CE]
        terms = [self.ce * _sum(ce)] if ce else []
        if kd:
            terms.append(self.kd * _sum(kd))
        if not terms:
            raise ValueError("an objective returned no loss parts; LossTerms.parts must hold at least the 'ce' sum")
        return _sum(terms) / self.denominator


def _sum(values: list[torch.Tensor]) -> torch.Tensor:
    total = values[0]
    for value in values[1:]:
        total = total + value
    return total


@dataclass
class Weighing:
    """The weights in force for one micro-batch, and the weighted losses that chunked parts handed over."""

    weights: LossWeights
    carried: list[tuple[torch.Tensor, frozenset[str]]] = field(default_factory=list)

    def carry(self, loss: torch.Tensor, names: frozenset[str]) -> None:
        """Take the weighted loss of parts `names`, whose gradients were computed with these weights."""
        self.carried.append((loss, names))

    def loss(self, terms) -> torch.Tensor:
        """The micro-batch's differentiable loss: every carried loss, plus the weighted parts nobody carried."""
        covered = frozenset().union(*(names for _, names in self.carried)) if self.carried else frozenset()
        rest = {name: value for name, value in terms.parts.items() if name not in covered}
        losses = [loss for loss, _ in self.carried]
        if rest or not losses:
            losses.append(self.weights.combine(rest))
        return _sum(losses)


_current: ContextVar[Weighing | None] = ContextVar("dskd_weighing", default=None)


@contextlib.contextmanager
def weighting(weights: LossWeights) -> Iterator[Weighing]:
    """Make `weights` current while an objective computes one micro-batch; `.loss(terms)` then gives its loss."""
    weighing = Weighing(weights)
    token = _current.set(weighing)
    try:
        yield weighing
    finally:
        _current.reset(token)


def current_weighing() -> Weighing | None:
    """The engine's weighing of this micro-batch, or None outside the engine."""
    return _current.get()


def objective_loss(
    objective,
    batch,
    student_hidden: torch.Tensor,
    signal,
    *,
    kd_rate: float = 0.0,
    denominator: float | None = None,
    weights: LossWeights | None = None,
):
    """One micro-batch's loss as the engine forms it, outside the engine: `(loss, terms)`.

    `kd_rate` is the job's `objective.kd_rate` (0 for an objective without distillation parts, like `sft`);
    `denominator` defaults to the batch's own valid student tokens (a one-batch step). A batch that trains only
    its CE or only its KD (`batch.ce` / `batch.kd`, a split step's halves) gives the other part weight zero.
    `weights`, when given, replaces all of that (e.g. a split step's scales).
    """
    if weights is None:
        denominator = float(batch.num_student_tokens()) if denominator is None else float(denominator)
        weights = LossWeights.for_batch(
            kd_rate=kd_rate,
            denominator=max(denominator, 1.0),
            ce_scale=1.0 if batch.ce else 0.0,
            kd_scale=1.0 if batch.kd else 0.0,
        )
    with weighting(weights) as weighing:
        terms = objective.compute(batch, student_hidden, signal)
        return weighing.loss(terms), terms
