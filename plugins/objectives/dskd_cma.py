"""`dskd_cma`: DSKD with cross-model attention (Zhang et al., EMNLP 2024, arXiv 2406.17328; spec §8.1, v1).

For different tokenizers without any token alignment: each student position attends over the teacher
positions of the same text. Queries are the student's (detached) embeddings of input and target token,
`query([E_s(x); E_s(y)])` with `query: Linear(2 d_s -> 2 d_t)`; keys are the teacher's, `[E_t(x); E_t(y)]`,
divided by one global std; scores are scaled by `sqrt(2 d_t)` and masked to label positions on both sides
(`dskd.kit.cross_model_attention`). Then, with the student head and the teacher head detached:

- student space: `z_t2s = head_s(A t2s(h_t/std + E_t(y)/std))`; `projector_ce = CE(z_t2s, y)` (gold labels)
  trains t2s and query; `kd_student_space = d(z_s, sg(z_t2s))` only where `argmax z_t2s = y`;
- teacher space: `z_s2t = head_t(A' s2t(h_s))`, `A'` the softmax over student positions;
  `kd_teacher_space = d(z_s2t, z_t)` trains s2t, query and the student body.

`L = [(1 - kd_rate) CE + kd_rate (projector_ce + kd_student_space + kd_teacher_space)] / D`, no tau^2
(the objective returns the sums; the engine weights them).

Choices where the reference differs:
- all three projectors (`Linear` with bias, v1's layout) are given to the optimizer and checkpointed
  (spec §14.6: the v2 repository never optimised `query`);
- teacher-space KD uses the configured divergence (v1 always used forward KL, spec §14.11);
- every term is a sum the engine divides by the step's global token count D (spec §0);
- the three std normalisers are taken over the label positions of the micro-batch, not over the padded
  `(B, T, d)` tensor: under dynamic padding the reference's statistic would change with how much padding and
  prompt a micro-batch holds, and masked positions receive no attention weight anyway. For the same reason
  the teacher is asked for its hidden states at label positions only, like every other objective;
- a position whose counterpart sequence has no label at all carries no KD or projector term (the reference
  attended uniformly over padding there).

The teacher must expose its input embeddings (`Teacher.embeddings`): a local teacher does; a gRPC teacher
sends only hidden states and its head, and is refused at setup (use `dskd_v2` with aligner `eta` instead).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import dskd
from dskd import IGNORE_INDEX, Batch, LossTerms, ModelError, PluginError, SignalRequest, TeacherSignal
from dskd.kit import (
    Objective,
    ObjectiveContext,
    Teacher,
    attention_weights,
    chunked_parts,
    gather_labels,
    gather_rows,
    member,
    packed,
    padded,
    sequence_has,
    teacher_hidden,
)


class Projectors(torch.nn.Module):
    def __init__(self, student_embedding: int, student_hidden: int, teacher_hidden: int) -> None:
        super().__init__()
        self.query = torch.nn.Linear(2 * student_embedding, 2 * teacher_hidden)
        self.t2s = torch.nn.Linear(teacher_hidden, student_hidden)
        self.s2t = torch.nn.Linear(student_hidden, teacher_hidden)


class DSKDCMA(Objective):
    request = SignalRequest(hidden_states=True)

    def __init__(
        self, context: ObjectiveContext, student_embedding: torch.nn.Module, teacher_embeddings: torch.Tensor
    ) -> None:
        self.student_head = context.student_head
        self.teacher_head = context.teacher.head
        # The module, not its weight: its parameter is read (detached) at every step, so it is the trained one even
        # when FSDP2 replaces the parameter object (inside `compute` the sharded root holds it whole).
        self.student_embedding = student_embedding
        self.teacher_embeddings = teacher_embeddings.detach()
        student_embeddings = student_embedding.weight
        self.divergence = context.divergence
        self.temperature = context.temperature
        self.chunk_size = context.chunk_size
        self.projectors = Projectors(
            student_embeddings.shape[1], self.student_head.hidden_size, self.teacher_head.hidden_size
        )
        self.projectors.to(self.student_head.weight.device)

    def trainable_modules(self) -> torch.nn.Module:
        return self.projectors

    def compute(self, batch: Batch, student_hidden: torch.Tensor, signal: TeacherSignal | None) -> LossTerms:
        h_t = teacher_hidden(signal, self.teacher_head.hidden_size, "dskd_cma").float()
        h_s = gather_rows(student_hidden, batch.student_rows)
        student_rows = {"h_s": h_s, "labels": gather_labels(batch.student_labels, batch.student_rows)}
        # Row counts are shapes, known on the host: a micro-batch with no label on one side has only the CE
        # (the std normalisers of an empty side would be NaN, and NaN * 0 weight is still NaN).
        cross = bool(h_t.shape[0] and h_s.shape[0])
        if cross:
            student_rows["h_t2s"], student_rows["valid"], h_s2t, t_valid = self._attend(batch, h_s, h_t)
        parts, metrics = chunked_parts(
            self._student_chunk(), student_rows, self.student_head.tensors(), chunk_size=self.chunk_size
        )
        counts = {"ce": torch.tensor(float(h_s.shape[0]), device=h_s.device)}
        if cross:
            teacher_rows = {"h_s2t": h_s2t, "h_t": h_t, "valid": t_valid}
            teacher_parts, _ = chunked_parts(self._teacher_chunk(), teacher_rows, {}, chunk_size=self.chunk_size)
            parts.update(teacher_parts)
            n_valid, n_agree = student_rows["valid"].sum().float(), metrics["t2s_agreement"]
            counts.update(
                projector_ce=n_valid,
                kd_student_space=n_agree,
                t2s_agreement=n_valid,
                kd_teacher_space=t_valid.sum().float(),
            )
        return LossTerms(parts=parts, counts=counts, metrics=metrics)

    def _attend(self, batch: Batch, h_s: torch.Tensor, h_t: torch.Tensor):
        """Projected values of each side, mixed by the cross-model attention, at the packed label rows."""
        (b, t_s), t_t = batch.student_labels.shape, batch.teacher_labels.shape[1]
        s_rows, t_rows = batch.student_rows, batch.teacher_rows
        e_s = self.student_embedding.weight.detach()
        x_s, y_s = gather_labels(batch.student_input_ids, s_rows), gather_labels(batch.student_labels, s_rows)
        x_t, y_t = gather_labels(batch.teacher_input_ids, t_rows), gather_labels(batch.teacher_labels, t_rows)
        e_t_x, e_t_y = (
            F.embedding(x_t, self.teacher_embeddings).float(),
            F.embedding(y_t, self.teacher_embeddings).float(),
        )
        key = torch.cat([e_t_x, e_t_y], dim=-1)
        key = key / key.std()
        p = self.projectors
        query = p.query(torch.cat([F.embedding(x_s, e_s), F.embedding(y_s, e_s)], dim=-1).float())
        t2s_values = p.t2s(h_t / h_t.std() + e_t_y / e_t_y.std())
        s2t_values = p.s2t(h_s.float())
        s_mask, t_mask = batch.student_labels != IGNORE_INDEX, batch.teacher_labels != IGNORE_INDEX
        t2s_weights, s2t_weights = attention_weights(
            padded(query, s_rows, b, t_s), padded(key, t_rows, b, t_t), s_mask, t_mask
        )
        h_t2s = packed(torch.bmm(t2s_weights, padded(t2s_values, t_rows, b, t_t)), s_rows)
        h_s2t = packed(torch.bmm(s2t_weights, padded(s2t_values, s_rows, b, t_s)), t_rows)
        return h_t2s, sequence_has(t_mask, s_rows, t_s), h_s2t, sequence_has(s_mask, t_rows, t_t)

    def _student_chunk(self):
        head, divergence, tau = self.student_head, self.divergence, self.temperature
        names = list(head.tensors())

        def chunk(r: dict, shared: dict):
            head_s = head.with_tensors({k: shared[k] for k in names})
            z_s = head_s.logits(r["h_s"])
            ce = F.cross_entropy(z_s, r["labels"], reduction="sum")
            if "h_t2s" not in r:
                return {"ce": ce}, {}
            z_t2s = head_s.detached().logits(r["h_t2s"])  # sg(W_s): this path trains the projectors only
            projector_ce = (F.cross_entropy(z_t2s, r["labels"], reduction="none") * r["valid"]).sum()
            agree = (z_t2s.argmax(-1) == r["labels"]) & r["valid"]
            kd = (divergence(z_s, z_t2s.detach(), temperature=tau) * agree).sum()
            return {"ce": ce, "projector_ce": projector_ce, "kd_student_space": kd}, {
                "t2s_agreement": agree.sum().float()
            }

        return chunk

    def _teacher_chunk(self):
        teacher_head, divergence, tau = self.teacher_head, self.divergence, self.temperature

        def chunk(r: dict, shared: dict):
            kd = (
                divergence(teacher_head.logits(r["h_s2t"]), teacher_head.logits(r["h_t"]), temperature=tau) * r["valid"]
            ).sum()
            return {"kd_teacher_space": kd}, {}

        return chunk


def dskd_cma(context: ObjectiveContext) -> DSKDCMA:
    """DSKD with cross-model attention (see the module docstring); no options."""
    teacher = context.teacher
    if teacher is None:
        raise PluginError("objective dskd_cma needs a teacher; set teacher.model, teacher.config or teacher.address")
    if "hidden_states" not in teacher.capabilities:
        raise PluginError("objective dskd_cma needs the teacher's hidden states, which this teacher cannot send")
    teacher_embeddings = member(teacher, Teacher, "embeddings")
    if teacher_embeddings is None:
        raise ModelError(
            "objective dskd_cma attends over the teacher's input embeddings, which this teacher does not offer "
            "(a gRPC teacher sends only hidden states and its LM head); use a local teacher (teacher.model), or "
            'objective "dskd_v2" with aligner "eta"'
        )
    if (
        teacher_embeddings.ndim != 2
        or teacher_embeddings.shape[1] != teacher.head.hidden_size
        or teacher_embeddings.shape[0] < len(teacher.tokenizer)
    ):
        raise ModelError(
            f"objective dskd_cma: the teacher's input embeddings have shape {tuple(teacher_embeddings.shape)}, but it "
            f"needs ({len(teacher.tokenizer)} or more, {teacher.head.hidden_size}) to add them to its hidden states; "
            'use a teacher whose embeddings match its hidden size, or objective "dskd_v2" with aligner "eta"'
        )
    embedding = context.student.get_input_embeddings()
    if embedding is None or getattr(embedding, "weight", None) is None:
        raise ModelError(
            f"objective dskd_cma needs the student's input embeddings, but {type(context.student).__name__} has none "
            "(get_input_embeddings() is None); use a Hugging Face causal LM as the student"
        )
    return DSKDCMA(context, embedding, teacher_embeddings)


@dskd.hookimpl
def dskd_register_objectives(register) -> None:
    register("dskd_cma", dskd_cma)
