"""What an objective plugin receives at setup, and what the engine expects of it.

An objective factory is called once, at setup, as `factory(context, **options)`. It checks what it needs
(a teacher, hidden states, the same vocabulary, ...) and raises a `DskdError` with a sentence when the run
cannot work, so a bad combination fails before the first step instead of deep inside torch. The object it
returns declares `request` (what the teacher must send) and computes `LossTerms` for each micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from dskd.chunked import chunked_loss
from dskd.lm_head import LMHead
from dskd.types import Batch, LossTerms, SignalRequest, TeacherSignal


@dataclass(frozen=True)
class ObjectiveContext:
    """Everything an objective factory may need, resolved by the engine before the objective is built."""

    student: torch.nn.Module
    student_tokenizer: Any
    student_head: LMHead  # a live view of the trainable head (gradients flow into it)
    teacher: Any  # a `dskd.teacher.Teacher`, or None for objectives that need none (sft)
    divergence: Callable[..., torch.Tensor]  # the configured divergence, options bound; call with temperature=
    divergence_name: str
    kd_rate: float
    temperature: float
    chunk_size: int
    aligner: Any = None  # the configured aligner (may expose vocab_map())
    same_vocab: bool = True

    @property
    def teacher_tokenizer(self) -> Any:
        return None if self.teacher is None else self.teacher.tokenizer


@runtime_checkable
class Objective(Protocol):
    request: SignalRequest
    """What the teacher must return for the valid teacher rows (empty: no teacher call)."""

    def trainable_modules(self) -> torch.nn.Module | None:
        """Parameters of the objective itself (projectors): trained with `train.projector_lr`, checkpointed."""
        ...

    def compute(self, batch: Batch, student_hidden: torch.Tensor, signal: TeacherSignal | None, denominator: float) -> LossTerms:
        """Loss of one micro-batch, weighted and divided by `denominator` (spec §0), plus per-term sums."""
        ...

    def on_optimizer_step(self) -> None:
        """Called after each optimizer step (e.g. to refresh a closed-form map of the student head)."""
        ...

    # Optional: `compute_ce(batch, student_hidden, denominator) -> LossTerms`, the CE part alone. A policy that
    # splits a step (on-policy: CE on the dataset's responses, KD on the student's samples) gives the engine
    # batches whose KD weight is zero; for those the engine calls `compute_ce` and does not ask the teacher at
    # all. An objective without it gets `compute` with a teacher signal and a zero KD scale, as before.


def gather_rows(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Packed `(N, d)` rows of `(B, T, d)` hidden states at flat positions `rows` (no host sync)."""
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)


def gather_labels(labels: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return labels.reshape(-1).index_select(0, rows)


def same_vocabulary(tokenizer_a: Any, tokenizer_b: Any) -> bool:
    """Identical token -> id maps (the condition for position-wise KD on a shared vocabulary)."""
    if tokenizer_a is tokenizer_b:
        return True
    return len(tokenizer_a) == len(tokenizer_b) and tokenizer_a.get_vocab() == tokenizer_b.get_vocab()


def mixing(batch: Batch, kd_rate: float) -> tuple[float, float]:
    """Weights of the summed CE and KD terms of a micro-batch, before division by the step's denominator D.

    `(1 - kd_rate, kd_rate)` (spec §1.3) times the engine's per-batch scales, which are 1 unless the policy split
    the step into CE-only and KD-only batches; then each part is renormalised over its own token population
    (e.g. on-policy: CE over the dataset responses, KD over the student's samples).
    """
    return (1.0 - kd_rate) * batch.ce_scale, kd_rate * batch.kd_scale


def packed_ce_terms(
    head: LMHead, hidden: torch.Tensor, labels: torch.Tensor, weight: float, denominator: float, chunk_size: int
) -> LossTerms:
    """`weight * sum of CE(head(hidden), labels) / D` over packed `(N, d)` rows, the logits made chunk by chunk
    (never `(N x V)` at once)."""

    def chunk(rows: dict, shared: dict):
        ce = F.cross_entropy(head.with_tensors(shared).logits(rows["hidden"]), rows["labels"], reduction="sum")
        return weight * ce / denominator, {"ce": ce.detach()}

    loss, sums = chunked_loss(chunk, {"hidden": hidden, "labels": labels}, head.tensors(), chunk_size=chunk_size)
    count = torch.tensor(float(labels.shape[0]), device=loss.device)
    return LossTerms(loss, sums={"ce": sums.get("ce", loss.new_zeros(()))}, counts={"ce": count})


def student_ce_terms(
    head: LMHead, batch: Batch, student_hidden: torch.Tensor, weight: float, denominator: float, chunk_size: int
) -> LossTerms:
    """The gold CE of a micro-batch's valid student tokens (`packed_ce_terms` over `batch.student_rows`).

    The whole of `sft`, and every teacher objective's `compute_ce`: the CE part of spec §1.3 needs the student
    alone, so a batch that trains only the CE costs no teacher call.
    """
    hidden = gather_rows(student_hidden, batch.student_rows)
    labels = gather_labels(batch.student_labels, batch.student_rows)
    return packed_ce_terms(head, hidden, labels, weight, denominator, chunk_size)


CROSS_TOKENIZER_OBJECTIVES = "dskd_v2 (with aligner eta), dskd_cma, uld or mined_kd"
