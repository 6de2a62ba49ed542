"""`dskd_v2`: DSKDv2 (arXiv 2504.11426; spec §5, and §6 across vocabularies).

Terms (see `dskd.kit.dual_space.dual_space_terms`): student-space KD against the teacher projected by a trainable
t2s map, the t2s map's cross-entropy on the teacher's top-1, and teacher-space KD of the student projected
by a closed-form s2t map, mixed with the gold CE by the engine (`kd_rate`).

- t2s: `Linear(d_t -> d_s)` without bias, initialised to the least-squares ("ideal") solution
  `Y = argmin ||Y S' - T'||` on the shared vocabulary V' (S', T' the heads' transposed rows on V'), so that at
  step 0 the projected teacher logits on V' equal the teacher's; then trained at `train.projector_lr`.
- s2t: `A = sg(S') pinv(T')`, the least-squares map from student to teacher space. pinv(T') is computed once
  (the teacher head is frozen); A follows the student head and is refreshed once per optimizer step
  (the reference recomputed it every micro-batch, spec §14.28, for the same result).
- Across vocabularies, pairs come from the aligner (ETA) and the top-1 condition goes through the aligner's
  teacher->student id map (one gather; -1 = no exact match, never <unk>/EOS by accident, spec §14.7).

Choices where the reference is buggy or batch-dependent (spec §14), each for a correct global token mean:
- every projector is given to the optimizer and checkpointed (the reference never trained s2t, §14.6);
- every term is a sum the engine divides by the step's global token count, not by micro-batch-local counts (§14.10), so the
  agreement gate removes tokens from the student-space KD without re-weighting the remaining ones;
- the gate is the agreement itself (`gate_student_kd`); the reference's `--t2s-agreement` threshold of 1.0
  compared a rate normalised by the *global* count and flipped branches on long micro-batches;
- shared-vocabulary ids stop at both tokenizers' sizes, so padded head rows never enter the least squares.
"""

from __future__ import annotations

import torch

import dskd
from dskd import Batch, LossTerms, ModelError, PluginError, SignalRequest, TeacherSignal
from dskd.kit import (
    Aligner,
    DualSpaceSpec,
    Objective,
    ObjectiveContext,
    dual_space_terms,
    least_squares_map,
    member,
    paired_rows,
    right_inverse_factor,
    shared_vocabulary,
    vocab_bytes,
)

TERMS = {"both": (True, True), "student": (True, False), "teacher": (False, True)}


class Projectors(torch.nn.Module):
    def __init__(self, teacher_size: int, student_size: int) -> None:
        super().__init__()
        self.t2s = torch.nn.Linear(teacher_size, student_size, bias=False)


class DSKDv2(Objective):
    request = SignalRequest(hidden_states=True)

    def __init__(
        self,
        context: ObjectiveContext,
        *,
        init_projector: bool,
        gate_student_kd: bool,
        terms: str,
        shared_vocab_limit: int,
    ) -> None:
        teacher = context.teacher
        self.student_head = context.student_head
        self.teacher_head = teacher.head
        self.divergence = context.divergence
        self.temperature = context.temperature
        self.chunk_size = context.chunk_size
        self.same_vocab = context.same_vocab
        device = self.student_head.weight.device
        self.vocab_map = None if context.same_vocab else member(context.aligner, Aligner, "vocab_map")().to(device)
        student_space, teacher_space = TERMS[terms]
        self.spec = DualSpaceSpec("teacher_top1", gate_student_kd, student_space, teacher_space)
        # The teacher's own tokens (not byte-fallback pieces) are preferred where several have a student token's bytes.
        own = None if context.same_vocab else torch.from_numpy(~vocab_bytes(context.teacher_tokenizer).byte_piece)
        self.shared = shared_vocabulary(
            self.teacher_head.vocab_size,
            self.student_head.vocab_size,
            self.vocab_map,
            limit=shared_vocab_limit,
            own=own,
        )
        self.student_ids = self.shared.student_ids.to(device)
        teacher_rows = self.teacher_head.weight.detach().index_select(
            0, self.shared.teacher_ids.to(self.teacher_head.weight.device)
        )
        self.projectors = Projectors(self.teacher_head.hidden_size, self.student_head.hidden_size).to(device)
        # Tokenizers with nothing in common: no least-squares init and a zero s2t map; every teacher top-1 then
        # maps to -1, so the KD terms carry no tokens and the step trains the CE alone (metrics show
        # train/accepted_pairs = 0) instead of refusing to run.
        if init_projector and len(self.shared):
            with torch.no_grad():
                y = least_squares_map(self._student_rows().T, teacher_rows.to(device).float().T)  # (d_t, d_s)
                self.projectors.t2s.weight.copy_(y.T)
        self.pinv_teacher = (
            right_inverse_factor(teacher_rows.to(device).float().T) if len(self.shared) else None
        )  # (V', d_t)
        self.on_optimizer_step()

    def _student_rows(self) -> torch.Tensor:
        return self.student_head.weight.detach().index_select(0, self.student_ids).float()  # (V', d_s)

    def trainable_modules(self) -> torch.nn.Module:
        return self.projectors

    def on_optimizer_step(self) -> None:
        # A = sg(S') pinv(T'): (d_s, V') @ (V', d_t); stored as a linear weight (d_t, d_s). A frozen student head
        # (a LoRA student) never changes it, so it is computed once.
        if getattr(self, "s2t_weight", None) is not None and not self.student_head.trainable:
            return
        with torch.no_grad():
            if self.pinv_teacher is None:
                self.s2t_weight = torch.zeros(
                    self.teacher_head.hidden_size, self.student_head.hidden_size, device=self.student_ids.device
                )
            else:
                self.s2t_weight = (self._student_rows().T @ self.pinv_teacher).T.contiguous()

    def describe(self) -> str:
        return f"shared vocabulary {len(self.shared)} tokens (least-squares init and s2t map)"

    def compute(self, batch: Batch, student_hidden: torch.Tensor, signal: TeacherSignal | None) -> LossTerms:
        rows = paired_rows(
            batch,
            student_hidden,
            signal,
            same_vocab=self.same_vocab,
            teacher_hidden_size=self.teacher_head.hidden_size,
            name="dskd_v2",
        )
        return dual_space_terms(
            self.spec,
            rows,
            student_head=self.student_head,
            teacher_head=self.teacher_head,
            t2s={"weight": self.projectors.t2s.weight},
            s2t={"weight": self.s2t_weight},
            vocab_map=self.vocab_map,
            divergence=self.divergence,
            temperature=self.temperature,
            chunk_size=self.chunk_size,
        )


def dskd_v2(
    context: ObjectiveContext,
    *,
    init_projector: bool = True,
    gate_student_kd: bool = True,
    terms: str = "both",
    shared_vocab_limit: int = 0,
) -> DSKDv2:
    """Options: `init_projector` (least-squares init of t2s), `gate_student_kd` (agreement gate),
    `terms` ("both", "student" or "teacher" space only), `shared_vocab_limit` (first k shared ids; 0 = all)."""
    if context.teacher is None:
        raise PluginError("objective dskd_v2 needs a teacher; set teacher.model, teacher.config or teacher.address")
    if "hidden_states" not in context.teacher.capabilities:
        raise PluginError("objective dskd_v2 needs the teacher's hidden states, which this teacher cannot send")
    if terms not in TERMS:
        raise PluginError(f"objective.terms must be one of {', '.join(TERMS)}, got {terms!r}")
    if shared_vocab_limit < 0:
        raise PluginError(f"objective.shared_vocab_limit must be >= 0, got {shared_vocab_limit}")
    if not context.same_vocab and (context.aligner is None or member(context.aligner, Aligner, "vocab_map")() is None):
        raise ModelError(
            "objective dskd_v2 with different vocabularies needs an aligner with a teacher->student vocabulary map; "
            'set aligner.name = "eta"'
        )
    return DSKDv2(
        context,
        init_projector=init_projector,
        gate_student_kd=gate_student_kd,
        terms=terms,
        shared_vocab_limit=shared_vocab_limit,
    )


@dskd.hookimpl
def dskd_register_objectives(register) -> None:
    register("dskd_v2", dskd_v2)
