"""`sft`: supervised fine-tuning, cross-entropy on the gold response tokens (no teacher).

Used for the teacher-SFT stage and as the "SFT only" baseline. The loss is
`sum over valid tokens of -log p_s(y) / D`, D being the step's loss denominator (spec §0), computed over
packed valid rows in chunks so the `(tokens x vocab)` logits never exist at once.
"""

from __future__ import annotations

import torch

import dskd
from dskd.objective import ObjectiveContext, student_ce_terms
from dskd.types import Batch, LossTerms, SignalRequest, TeacherSignal


class SFT:
    request = SignalRequest()

    def __init__(self, context: ObjectiveContext) -> None:
        self.head = context.student_head
        self.chunk_size = context.chunk_size

    def trainable_modules(self) -> None:
        return None

    def on_optimizer_step(self) -> None:
        pass

    def compute(self, batch: Batch, student_hidden: torch.Tensor, signal: TeacherSignal | None, denominator: float) -> LossTerms:
        # SFT has no KD part: the CE carries full weight, scaled only when a policy split the step.
        return student_ce_terms(self.head, batch, student_hidden, batch.ce_scale, denominator, self.chunk_size)


def sft(context: ObjectiveContext) -> SFT:
    return SFT(context)


sft.needs_teacher = False  # the config does not ask for a teacher when this objective is chosen


@dskd.hookimpl
def dskd_register_objectives(register) -> None:
    register("sft", sft)
