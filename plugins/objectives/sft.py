"""`sft`: supervised fine-tuning, cross-entropy on the gold response tokens (no teacher).

Used for the teacher-SFT stage and as the "SFT only" baseline. The loss is
`sum over valid tokens of -log p_s(y) / D`, D being the step's loss denominator (spec §0), computed over
packed valid rows in chunks so the `(tokens x vocab)` logits never exist at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import dskd
from dskd.chunked import chunked_loss
from dskd.objective import ObjectiveContext, gather_labels, gather_rows
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
        hidden = gather_rows(student_hidden, batch.student_rows)
        labels = gather_labels(batch.student_labels, batch.student_rows)
        head = self.head
        # SFT has no KD part: the CE carries full weight, scaled only when a policy split the step.
        weight = batch.ce_scale

        def chunk(rows: dict, shared: dict):
            ce = F.cross_entropy(head.with_tensors(shared).logits(rows["hidden"]), rows["labels"], reduction="sum")
            return weight * ce / denominator, {"ce": ce.detach()}

        loss, sums = chunked_loss(chunk, {"hidden": hidden, "labels": labels}, head.tensors(), chunk_size=self.chunk_size)
        count = torch.tensor(float(labels.shape[0]), device=loss.device)
        return LossTerms(loss, sums={"ce": sums.get("ce", torch.zeros((), device=loss.device))}, counts={"ce": count})


def sft(context: ObjectiveContext) -> SFT:
    return SFT(context)


sft.needs_teacher = False  # the config does not ask for a teacher when this objective is chosen


@dskd.hookimpl
def dskd_register_objectives(register) -> None:
    register("sft", sft)
