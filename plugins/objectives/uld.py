"""`uld`: Universal Logit Distillation (Boizard et al., 2024, arXiv 2402.12030; spec §9.2).

A cross-tokenizer baseline that needs no vocabulary map: each distribution is sorted over its own vocabulary,
and the student's sorted probabilities are pulled towards the teacher's, rank by rank:

    uld(z_s, z_t) = sum_r |sort(p_s)_r - sort(p_t)_r|,   p = softmax(z / tau), sorted descending,

with the shorter vocabulary padded by zeros (so the longer one's tail adds its own mass), a Wasserstein-1
surrogate between the two "shapes" of distribution. Token k of the student's response is compared with
token k of the teacher's (the `index` aligner, its default), and

    L = [(1 - kd_rate) * sum CE(z_s, y) + kd_rate * sum_{paired rows} uld] / D

over all valid student tokens for the CE (spec §1.3: no tau^2). The teacher's distribution comes from its
last hidden states through its LM head.

Where we differ from the reference (spec §14.19): the configured temperature divides *both* logits (the
reference ignored `--kd-temperature`, so its scripts' tau = 2 was silently 1; `objective.temperature = 1`
gives the reference's numbers), and nothing is rotated or mutated in place: the pairs come from the data
loader. The configured divergence is not used, since ULD is itself the distance; any `[divergence]` setting
is accepted and ignored rather than refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import dskd
from dskd import Batch, LossTerms, PluginError, SignalRequest, TeacherSignal
from dskd.kit import (
    Objective,
    ObjectiveContext,
    chunked_parts,
    gather_labels,
    gather_rows,
    row_partners,
    teacher_hidden,
)


def uld_distance(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """Per-row `sum_r |sort(p_s)_r - sort(p_t)_r|` for `(N, V_s)` and `(N, V_t)` logits; `(N,)` float32
    (float64 for float64 input, so `torch.autograd.gradcheck` can check it).

    The zero padding of the shorter vocabulary is never materialised: past the shorter length the
    difference is the longer side's own sorted mass.
    """
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    p_s = torch.softmax(student_logits.to(dtype) / temperature, dim=-1).sort(dim=-1, descending=True).values
    p_t = torch.softmax(teacher_logits.to(dtype) / temperature, dim=-1).sort(dim=-1, descending=True).values
    common = min(p_s.shape[-1], p_t.shape[-1])
    head = (p_s[:, :common] - p_t[:, :common]).abs().sum(-1)
    return head + p_s[:, common:].sum(-1) + p_t[:, common:].sum(-1)


class ULD(Objective):
    request = SignalRequest(hidden_states=True)

    def __init__(self, context: ObjectiveContext) -> None:
        self.head = context.student_head
        self.teacher_head = context.teacher.head
        self.temperature = context.temperature
        self.chunk_size = context.chunk_size
        self.same_vocab = context.same_vocab

    def compute(self, batch: Batch, student_hidden: torch.Tensor, signal: TeacherSignal | None) -> LossTerms:
        h_t = teacher_hidden(signal, self.teacher_head.hidden_size, "uld")
        partners = row_partners(batch, h_t.shape[0], same_vocab=self.same_vocab, name="uld", aligner_hint="index")
        rows = {
            "hidden": gather_rows(student_hidden, batch.student_rows),
            "labels": gather_labels(batch.student_labels, batch.student_rows),
            "teacher_hidden": partners.teacher_rows(h_t),
            "paired": partners.paired,
        }
        head, teacher_head, tau = self.head, self.teacher_head, self.temperature

        def chunk(r: dict, shared: dict):
            z_s = head.with_tensors(shared).logits(r["hidden"])
            ce = F.cross_entropy(z_s, r["labels"], reduction="sum")
            # Unpaired rows (the longer response's tail) are computed and zeroed: a masked multiply keeps
            # every shape static, and with index alignment they are a handful of rows per sequence.
            kd = (uld_distance(z_s, teacher_head.logits(r["teacher_hidden"]), temperature=tau) * r["paired"]).sum()
            return {"ce": ce, "kd": kd}, {}

        parts, _ = chunked_parts(chunk, rows, head.tensors(), chunk_size=self.chunk_size)
        counts = {
            "ce": torch.tensor(float(rows["labels"].shape[0]), device=partners.paired.device),
            "kd": partners.paired.sum().float(),
        }
        return LossTerms(parts=parts, counts=counts)


def uld(context: ObjectiveContext) -> ULD:
    """ULD over index-aligned response tokens (see the module docstring); no options."""
    if context.teacher is None:
        raise PluginError("objective uld needs a teacher; set teacher.model, teacher.config or teacher.address")
    if "hidden_states" not in context.teacher.capabilities:
        raise PluginError(
            "objective uld takes the teacher's distribution from its hidden states and LM head, but this teacher "
            "cannot send hidden states; serve the teacher with hidden states enabled"
        )
    return ULD(context)


uld.default_aligner = "index"


@dskd.hookimpl
def dskd_register_objectives(register) -> None:
    register("uld", uld)
