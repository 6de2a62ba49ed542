"""`sft`: supervised fine-tuning, cross-entropy on the gold response tokens (no teacher).

Used for the teacher-SFT stage and as the "SFT only" baseline. The loss is
`sum over valid tokens of -log p_s(y) / D`, D being the step's global token count (spec §0), computed over
packed valid rows in chunks so the `(tokens x vocab)` logits never exist at once. It has no distillation
part, so the engine gives its CE the full weight (`needs_teacher = False`: no `kd_rate` applies).
"""

from __future__ import annotations

import torch

import dskd
from dskd import Batch, LossTerms, TeacherSignal
from dskd.kit import Objective, ObjectiveContext, student_ce_terms


class SFT(Objective):
    def __init__(self, context: ObjectiveContext) -> None:
        self.head = context.student_head
        self.chunk_size = context.chunk_size

    def compute(self, batch: Batch, student_hidden: torch.Tensor, signal: TeacherSignal | None) -> LossTerms:
        return student_ce_terms(self.head, batch, student_hidden, self.chunk_size)


def sft(context: ObjectiveContext) -> SFT:
    return SFT(context)


sft.needs_teacher = False  # the config does not ask for a teacher when this objective is chosen
sft.teacher_sft = True  # the objective the teacher_sft stage trains the teacher with


@dskd.hookimpl
def dskd_register_objectives(register) -> None:
    register("sft", sft)
