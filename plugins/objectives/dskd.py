"""`dskd`: Dual-Space Knowledge Distillation v1 (Zhang et al., EMNLP 2024, arXiv 2406.17328; spec §4).

Two trainable projectors with bias, `t2s: Linear(d_t -> d_s)` and `s2t: Linear(d_s -> d_t)`, unify the output
spaces: the teacher's last hidden states projected into the student's space go through the student's
(detached) head, and the student's projected into the teacher's space go through the teacher's frozen head.
Terms: student-space KD `d(z_s, sg(z_t2s))`, the projector's CE on the gold tokens, and teacher-space KD
`d(z_s2t, z_t)`, mixed with the gold CE by the engine (`kd_rate`, the step's global token count).

Choices where the reference differs (spec §4.4, §14.6, §14.11): both projectors are optimised (the v2
repository's copy never optimised s2t); teacher-space KD uses the configured divergence (v1 always used
forward KL); positions coincide, so the vocabularies must be identical — for different tokenizers use
dskd_v2 with aligner eta, or dskd_cma.
"""

from __future__ import annotations

import torch

import dskd
from dskd import Batch, LossTerms, ModelError, PluginError, SignalRequest, TeacherSignal
from dskd.kit import DualSpaceSpec, Objective, ObjectiveContext, dual_space_terms, paired_rows


class Projectors(torch.nn.Module):
    def __init__(self, teacher_size: int, student_size: int) -> None:
        super().__init__()
        self.t2s = torch.nn.Linear(teacher_size, student_size, bias=True)
        self.s2t = torch.nn.Linear(student_size, teacher_size, bias=True)


class DSKD(Objective):
    request = SignalRequest(hidden_states=True)

    def __init__(self, context: ObjectiveContext) -> None:
        self.student_head = context.student_head
        self.teacher_head = context.teacher.head
        self.divergence = context.divergence
        self.temperature = context.temperature
        self.chunk_size = context.chunk_size
        self.spec = DualSpaceSpec("gold", gate_student_kd=False)
        device = self.student_head.weight.device
        self.projectors = Projectors(self.teacher_head.hidden_size, self.student_head.hidden_size).to(device)

    def trainable_modules(self) -> torch.nn.Module:
        return self.projectors

    def compute(self, batch: Batch, student_hidden: torch.Tensor, signal: TeacherSignal | None) -> LossTerms:
        rows = paired_rows(
            batch,
            student_hidden,
            signal,
            same_vocab=True,
            teacher_hidden_size=self.teacher_head.hidden_size,
            name="dskd",
        )
        p = self.projectors
        return dual_space_terms(
            self.spec,
            rows,
            student_head=self.student_head,
            teacher_head=self.teacher_head,
            t2s={"weight": p.t2s.weight, "bias": p.t2s.bias},
            s2t={"weight": p.s2t.weight, "bias": p.s2t.bias},
            vocab_map=None,
            divergence=self.divergence,
            temperature=self.temperature,
            chunk_size=self.chunk_size,
        )


def dskd_objective(context: ObjectiveContext) -> DSKD:
    if context.teacher is None:
        raise PluginError("objective dskd needs a teacher; set teacher.model, teacher.config or teacher.address")
    if not context.same_vocab:
        raise ModelError(
            "objective dskd (v1) pairs student and teacher positions one to one, which needs one shared vocabulary; "
            'for different tokenizers use objective "dskd_v2" with aligner "eta", or "dskd_cma"'
        )
    return DSKD(context)


@dskd.hookimpl
def dskd_register_objectives(register) -> None:
    register("dskd", dskd_objective)
