"""`mined_kd`: KD through minimum-edit-distance token and vocabulary alignment (FuseLLM-style; spec §9.1).

The `mined` aligner (its default) pairs student and teacher response tokens one to one by DTW over token
strings, and maps every teacher id to a student id (exact bytes first, else the nearest spelling). From that
map the objective builds, once at setup, `stu2tea (V_s,)`: for each student id, one teacher id mapped to it,
or -1. The teacher's logits are then moved into the student's vocabulary:

- a student token paired with teacher position i gets `z[s] = z_t[i, stu2tea[s]]` where `stu2tea[s] >= 0`,
  and -1e5 elsewhere (a finite "minus infinity" as in the reference, so that every divergence, reverse KL
  included, still sees and penalises student mass on tokens the teacher cannot express);
- an unpaired student token gets a one-hot target: 100 at its gold token, -1e5 elsewhere (spec step 5;
  option `unaligned = "skip"` leaves those tokens to the CE alone instead).

`L = [(1 - kd_rate) sum CE(z_s, y) + kd_rate sum d(z_s, z~_t)] / D` over the valid student tokens, with the
configured divergence `d` and temperature (spec §1.3: no tau^2).

Where we differ from the reference (spec §14.20): the map is an id-indexed array from the aligner, never a JSON
object whose key order matters; and of the teacher ids that map to one student id, `stu2tea` keeps the one
whose bytes equal the student token's (the token the teacher actually emits for that text) when there is
one, else the lowest id, instead of whichever came first in a file.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import dskd
from dskd import Batch, LossTerms, ModelError, PluginError, SignalRequest, TeacherSignal
from dskd.kit import (
    Aligner,
    Objective,
    ObjectiveContext,
    chunked_parts,
    exact_byte_map,
    gather_labels,
    gather_rows,
    member,
    row_partners,
    teacher_hidden,
    vocab_bytes,
)

MASKED_LOGIT = -1e5  # the reference's "no probability" logit: exp underflows to exactly 0 in float32
GOLD_LOGIT = 100.0  # the reference's one-hot logit; 100 - (-1e5) leaves no mass elsewhere at any tau <= 1e3


def student_to_teacher(
    vocab_map: np.ndarray,
    student_size: int,
    exact: np.ndarray | None = None,
    teacher_byte_piece: np.ndarray | None = None,
) -> np.ndarray:
    """`(V_s,)` int64: for each student id one teacher id that `vocab_map (V_t,)` sends to it, else -1.

    Preference among several: a teacher id whose `exact` map (identical bytes) is that student id and that is
    not a byte-fallback piece, then any exact one, then the lowest teacher id.
    """
    teacher = np.flatnonzero((vocab_map >= 0) & (vocab_map < student_size))
    student = vocab_map[teacher]
    rank = np.full(teacher.size, 2, dtype=np.int64)
    if exact is not None:
        is_exact = exact[teacher] == student
        rank[is_exact] = 1
        if teacher_byte_piece is not None:
            rank[is_exact & ~teacher_byte_piece[teacher]] = 0
    order = np.lexsort((teacher, rank, student))  # by student id, then preference, then teacher id
    teacher, student = teacher[order], student[order]
    first = np.ones(student.size, dtype=bool)
    first[1:] = student[1:] != student[:-1]
    out = np.full(student_size, -1, dtype=np.int64)
    out[student[first]] = teacher[first]
    return out


def transformed_teacher_logits(
    teacher_logits: torch.Tensor, stu2tea: torch.Tensor, labels: torch.Tensor, paired: torch.Tensor
) -> torch.Tensor:
    """`(N, V_s)` targets: the teacher's logits gathered through `stu2tea` on paired rows, one-hot at the gold
    student token on the others, `MASKED_LOGIT` wherever there is nothing (spec §9.1 steps 4-5)."""
    mapped = stu2tea >= 0
    moved = teacher_logits.index_select(1, stu2tea.clamp_min(0)).masked_fill(~mapped, MASKED_LOGIT)
    one_hot = torch.full_like(moved, MASKED_LOGIT).scatter(1, labels[:, None], GOLD_LOGIT)
    return torch.where(paired[:, None], moved, one_hot)


def id_table(context: ObjectiveContext) -> np.ndarray:
    """`stu2tea` for a run: from the aligner's vocabulary map, with the exact-bytes preference of
    `student_to_teacher`; the identity on one shared vocabulary without an aligner."""
    student_size, teacher_size = context.student_head.vocab_size, context.teacher.head.vocab_size
    if context.aligner is None and context.same_vocab:
        return np.arange(student_size, dtype=np.int64)
    if context.aligner is None or member(context.aligner, Aligner, "vocab_map")() is None:
        raise ModelError(
            "objective mined_kd needs an aligner with a teacher->student vocabulary map; set "
            'aligner.name = "mined" (or leave it empty to get that default)'
        )

    def per_teacher_id(values: np.ndarray, fill) -> np.ndarray:
        """`values` cut or padded with `fill` to the teacher head's size (a padded head has extra ids)."""
        out = np.full(teacher_size, fill, dtype=values.dtype)
        out[: min(teacher_size, values.size)] = values[:teacher_size]
        return out

    vocab_map = per_teacher_id(
        member(context.aligner, Aligner, "vocab_map")().detach().cpu().numpy().astype(np.int64), -1
    )
    t_bytes, s_bytes = vocab_bytes(context.teacher_tokenizer), vocab_bytes(context.student_tokenizer)
    exact = per_teacher_id(exact_byte_map(t_bytes, s_bytes), -1)
    return student_to_teacher(vocab_map, student_size, exact, per_teacher_id(t_bytes.byte_piece, False))


class MinEDKD(Objective):
    request = SignalRequest(hidden_states=True)

    def __init__(self, context: ObjectiveContext, stu2tea: torch.Tensor, unaligned: str) -> None:
        self.head = context.student_head
        self.teacher_head = context.teacher.head
        self.divergence = context.divergence
        self.temperature = context.temperature
        self.chunk_size = context.chunk_size
        self.same_vocab = context.same_vocab
        self.stu2tea = stu2tea.to(self.head.weight.device)
        self.skip_unaligned = unaligned == "skip"

    def compute(self, batch: Batch, student_hidden: torch.Tensor, signal: TeacherSignal | None) -> LossTerms:
        h_t = teacher_hidden(signal, self.teacher_head.hidden_size, "mined_kd")
        partners = row_partners(batch, h_t.shape[0], same_vocab=self.same_vocab, name="mined_kd", aligner_hint="mined")
        # Rows that carry KD: every student token (unpaired ones against their one-hot), or the paired ones.
        weight = partners.paired if self.skip_unaligned else torch.ones_like(partners.paired)
        rows = {
            "hidden": gather_rows(student_hidden, batch.student_rows),
            "labels": gather_labels(batch.student_labels, batch.student_rows),
            "teacher_hidden": partners.teacher_rows(h_t),
            "paired": partners.paired,
            "weight": weight,
        }
        head, teacher_head, divergence, stu2tea = self.head, self.teacher_head, self.divergence, self.stu2tea
        tau = self.temperature

        def chunk(r: dict, shared: dict):
            z_s = head.with_tensors(shared).logits(r["hidden"])
            ce = F.cross_entropy(z_s, r["labels"], reduction="sum")
            target = transformed_teacher_logits(
                teacher_head.logits(r["teacher_hidden"]), stu2tea, r["labels"], r["paired"]
            )
            kd = (divergence(z_s, target, temperature=tau) * r["weight"]).sum()
            return {"ce": ce, "kd": kd}, {}

        parts, _ = chunked_parts(chunk, rows, head.tensors(), chunk_size=self.chunk_size)
        counts = {"ce": torch.tensor(float(rows["labels"].shape[0]), device=weight.device), "kd": weight.sum().float()}
        return LossTerms(parts=parts, counts=counts)


def mined_kd(context: ObjectiveContext, *, unaligned: str = "gold") -> MinEDKD:
    """Options: `unaligned` = "gold" (unpaired tokens distil towards a one-hot gold target, as the reference)
    or "skip" (they carry only the CE)."""
    teacher = context.teacher
    if teacher is None:
        raise PluginError("objective mined_kd needs a teacher; set teacher.model, teacher.config or teacher.address")
    if "hidden_states" not in teacher.capabilities:
        raise PluginError(
            "objective mined_kd takes the teacher's logits from its hidden states and LM head, but this teacher "
            "cannot send hidden states; serve the teacher with hidden states enabled"
        )
    if unaligned not in ("gold", "skip"):
        raise PluginError(f'objective.unaligned must be "gold" or "skip", got {unaligned!r}')
    stu2tea = id_table(context)
    if not (stu2tea >= 0).any():
        raise ModelError(
            "objective mined_kd: the aligner's vocabulary map sends no teacher token to a student token, so no "
            'teacher logit can be moved into the student vocabulary; check the tokenizers, or use objective "uld"'
        )
    return MinEDKD(context, torch.from_numpy(stu2tea), unaligned)


mined_kd.default_aligner = "mined"


@dskd.hookimpl
def dskd_register_objectives(register) -> None:
    register("mined_kd", mined_kd)
