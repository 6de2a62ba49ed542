"""What an objective plugin receives at setup, and what the engine expects of it.

An objective factory is called once, at setup, as `factory(context, **options)`. It checks what it needs
(a teacher, hidden states, the same vocabulary, ...) and raises a `DskdError` with a sentence when the run
cannot work, so a bad combination fails before the first step instead of deep inside torch. The object it
returns (an `Objective`) declares `request` (what the teacher must send) and computes unweighted `LossTerms`
for each micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dskd.kit.chunked import chunked_parts
from dskd.kit.lm_head import LMHead
from dskd.types import Batch, LossTerms, SignalRequest, TeacherSignal


@dataclass(frozen=True)
class ObjectiveContext:
    """Everything an objective factory may need, resolved by the engine before the objective is built."""

    student: torch.nn.Module
    student_tokenizer: Any
    student_head: LMHead  # a live view of the trainable head (gradients flow into it)
    teacher: Any  # a `dskd.models.teacher.Teacher`, or None for objectives that need none (sft)
    divergence: Callable[..., torch.Tensor]  # the configured divergence, options bound; call with temperature=
    divergence_name: str
    temperature: float
    chunk_size: int
    aligner: Any = None  # the configured aligner (may expose vocab_map())
    same_vocab: bool = True

    @property
    def teacher_tokenizer(self) -> Any:
        return None if self.teacher is None else self.teacher.tokenizer


class Objective:
    """What the engine uses of an objective. Subclass it, or provide the same members: those with a default
    here are optional (`dskd.kit.declared` fills them in for an object that lacks them).

    An objective turns one micro-batch into *unweighted* loss parts (`LossTerms.parts`: the gold CE as
    `"ce"`, its distillation terms under any other names). The engine weights them (`1 - kd_rate`, `kd_rate`,
    a split step's scales, the step's global token count), so `compute` reads like the method's formula.
    """

    request: SignalRequest = SignalRequest()
    """What the teacher must return for the valid teacher rows (empty: no teacher call)."""

    def compute(self, batch: Batch, student_hidden: torch.Tensor, signal: TeacherSignal | None) -> LossTerms:
        """The loss parts of one micro-batch, summed over its tokens, with their token counts."""
        raise NotImplementedError

    def trainable_modules(self) -> torch.nn.Module | None:
        """Parameters of the objective itself (projectors): trained with `train.projector_lr`, checkpointed."""
        return None

    def on_optimizer_step(self) -> None:
        """Called after each optimizer step and after a resume (e.g. to refresh a closed-form map of the
        student head)."""

    def describe(self) -> str:
        """One line printed at setup about what the objective built (e.g. the shared vocabulary's size)."""
        return ""


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


def packed_ce_terms(head: LMHead, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int) -> LossTerms:
    """The summed CE of `head(hidden)` against `labels` over packed `(N, d)` rows, the logits made chunk by
    chunk (never `(N x V)` at once): the part `"ce"` and its token count."""

    def chunk(rows: dict, shared: dict):
        return {
            "ce": F.cross_entropy(head.with_tensors(shared).logits(rows["hidden"]), rows["labels"], reduction="sum")
        }, {}

    parts, _ = chunked_parts(chunk, {"hidden": hidden, "labels": labels}, head.tensors(), chunk_size=chunk_size)
    count = torch.tensor(float(labels.shape[0]), device=parts["ce"].device)
    return LossTerms(parts=parts, counts={"ce": count})


def student_ce_terms(head: LMHead, batch: Batch, student_hidden: torch.Tensor, chunk_size: int) -> LossTerms:
    """The gold CE of a micro-batch's valid student tokens (`packed_ce_terms` over `batch.student_rows`).

    The whole of `sft`, and what the engine computes itself for a batch of a split step that trains only the
    CE: that part of spec §1.3 needs the student alone, so such a batch costs no teacher call.
    """
    hidden = gather_rows(student_hidden, batch.student_rows)
    labels = gather_labels(batch.student_labels, batch.student_rows)
    return packed_ce_terms(head, hidden, labels, chunk_size)


CROSS_TOKENIZER_OBJECTIVES = "dskd_v2 (with aligner eta), dskd_cma, uld or mined_kd"
