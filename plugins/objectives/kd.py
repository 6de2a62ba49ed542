"""`kd`: vanilla knowledge distillation on a shared vocabulary (spec §3).

`L = [(1 - kd_rate) * sum CE(z_s, y) + kd_rate * sum d(z_s, z_t)] / D` over the valid tokens, with `d` the
configured divergence at the configured temperature (no tau^2 factor, as in the reference, spec §1.3) and D
the step's global token count (spec §0); the objective returns the two sums, the engine weights them. Position t of the student is compared with position t of the
teacher, which is only meaningful when both tokenise identically, so different vocabularies are refused at
setup (use a cross-tokenizer objective). The teacher's distribution comes from its last hidden states
through its LM head (exact, and 2*d_t bytes a token on the wire instead of 2*V_t), or from its top-k
log-probabilities with tail mass when `teacher_signal = "top_k"` and the divergence accepts a sparse teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import dskd
from dskd import Batch, DskdError, LossTerms, ModelError, PluginError, SignalRequest, SparseTeacher, TeacherSignal
from dskd.kit import CROSS_TOKENIZER_OBJECTIVES, Objective, ObjectiveContext, chunked_parts, gather_labels, gather_rows


class KD(Objective):
    def __init__(self, context: ObjectiveContext, teacher_signal: str, top_k: int) -> None:
        self.head = context.student_head
        self.teacher_head = context.teacher.head
        self.divergence = context.divergence
        self.temperature = context.temperature
        self.chunk_size = context.chunk_size
        self.sparse = teacher_signal == "top_k"
        self.request = SignalRequest(top_k=top_k) if self.sparse else SignalRequest(hidden_states=True)

    def compute(self, batch: Batch, student_hidden: torch.Tensor, signal: TeacherSignal | None) -> LossTerms:
        hidden = gather_rows(student_hidden, batch.student_rows)
        labels = gather_labels(batch.student_labels, batch.student_rows)
        if signal is None or signal.num_rows != hidden.shape[0]:
            raise DskdError(
                "kd compares student and teacher position by position, but the two tokenisations of a batch differ "
                f"({hidden.shape[0]} student vs {None if signal is None else signal.num_rows} teacher tokens); "
                f"use {CROSS_TOKENIZER_OBJECTIVES}"
            )
        rows = {"hidden": hidden, "labels": labels}
        if self.sparse:
            rows.update(ids=signal.topk_ids, logprobs=signal.topk_logprobs, tail=signal.tail_logmass)
        else:
            rows["teacher_hidden"] = signal.hidden_states
        head, teacher_head, divergence, tau = self.head, self.teacher_head, self.divergence, self.temperature

        def chunk(r: dict, shared: dict):
            z_s = head.with_tensors(shared).logits(r["hidden"])
            ce = F.cross_entropy(z_s, r["labels"], reduction="sum")
            if self.sparse:
                teacher = SparseTeacher(r["ids"], r["logprobs"].float(), r["tail"].float())
            else:
                teacher = teacher_head.logits(r["teacher_hidden"])
            kd = divergence(z_s, teacher, temperature=tau).sum()
            return {"ce": ce, "kd": kd}, {}

        parts, _ = chunked_parts(chunk, rows, head.tensors(), chunk_size=self.chunk_size)
        count = torch.tensor(float(labels.shape[0]), device=labels.device)
        return LossTerms(parts=parts, counts={"ce": count, "kd": count})


def kd(context: ObjectiveContext, *, teacher_signal: str = "hidden", top_k: int = 64) -> KD:
    """Options: `teacher_signal` = "hidden" (exact full distribution from hidden states and the LM head) or
    "top_k" (the teacher's `top_k` log-probabilities plus tail mass; needs a divergence that accepts them)."""
    if context.teacher is None:
        raise PluginError("objective kd needs a teacher; set teacher.model, teacher.config or teacher.address")
    if not context.same_vocab:
        raise ModelError(
            "objective kd compares the teacher's and the student's distributions over one shared vocabulary, but the "
            f"two tokenizers differ; use a cross-tokenizer objective: {CROSS_TOKENIZER_OBJECTIVES}"
        )
    if teacher_signal not in ("hidden", "top_k"):
        raise PluginError(f'objective.teacher_signal must be "hidden" or "top_k", got {teacher_signal!r}')
    if teacher_signal == "top_k":
        if top_k < 1:
            raise PluginError(f"objective.top_k must be >= 1, got {top_k}")
        if not getattr(context.divergence, "accepts_sparse_teacher", False):
            raise PluginError(
                f"divergence {context.divergence_name!r} needs dense teacher logits, but objective.teacher_signal is "
                f'"top_k"; use teacher_signal = "hidden" or a divergence that accepts a sparse teacher (forward_kl, reverse_kl)'
            )
    return KD(context, teacher_signal, top_k)


# hidden: the exact distribution from stored hidden states and head; topk: with teacher_signal = "top_k"
kd.teacher_store_modes = ("hidden", "topk")


@dskd.hookimpl
def dskd_register_objectives(register) -> None:
    register("kd", kd)
