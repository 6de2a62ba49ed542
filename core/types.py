"""The values that pass between the stages of a run (ARCHITECTURE §3a), named once.

- `Alignment`: what an aligner returns for one pair of tokenizations of the same text.
- `Batch`: what the data loader yields: student and teacher ids and labels of the same text, and the alignment.
- `SignalRequest` / `TeacherSignal`: what an objective asks of a teacher and what the teacher returns.
- `LossTerms`: what an objective returns: its unweighted, differentiable loss parts, with token counts.

Later features add fields here; they never introduce a parallel type.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch

IGNORE_INDEX = -100
"""Label value of positions that carry no loss: prompt tokens and padding."""


def _moved(value, device: torch.device | str):
    """A copy of a dataclass with every tensor field on `device`."""
    moved = {}
    for f in fields(value):
        item = getattr(value, f.name)
        moved[f.name] = item.to(device, non_blocking=True) if isinstance(item, torch.Tensor) else item
    return replace(value, **moved)


@dataclass(frozen=True)
class Alignment:
    """Aligned token pairs of two tokenizations of the same text.

    `pairs` has shape `(K, 2)`, dtype int64; each row is `(teacher_position, student_position)` and both
    columns are strictly increasing down the rows.
    """

    pairs: np.ndarray

    def __post_init__(self) -> None:
        pairs = np.asarray(self.pairs, dtype=np.int64).reshape(-1, 2)
        object.__setattr__(self, "pairs", pairs)

    def __len__(self) -> int:
        return int(self.pairs.shape[0])

    def is_monotonic(self) -> bool:
        """Both columns strictly increasing (the contract every aligner must honour)."""
        if len(self) < 2:
            return True
        return bool(np.all(np.diff(self.pairs, axis=0) > 0))


@dataclass
class Batch:
    """One micro-batch, padded dynamically to its longest sequence (per model).

    Positions follow the causal-LM convention: the hidden state at position `p` predicts `labels[p]`
    (= `input_ids[p + 1]`); prompt and padding positions carry `IGNORE_INDEX`.

    `alignment`, when the vocabularies differ, has shape `(K, 3)`: rows `(batch_index, teacher_position,
    student_position)` in *label* coordinates, i.e. `teacher_labels[b, t]` and `student_labels[b, s]` are tokens
    with the same text span, so the hidden states at `t` and `s` are paired.
    """

    student_input_ids: torch.Tensor  # (B, T_s) int64
    student_attention_mask: torch.Tensor  # (B, T_s) int64
    student_labels: torch.Tensor  # (B, T_s) int64, IGNORE_INDEX on prompt and padding
    teacher_input_ids: torch.Tensor  # (B, T_t)
    teacher_attention_mask: torch.Tensor  # (B, T_t)
    teacher_labels: torch.Tensor  # (B, T_t)
    alignment: torch.Tensor | None = None  # (K, 3) int64
    student_prompt_lengths: torch.Tensor | None = None  # (B,) prompt tokens per sequence (student tokenizer)
    teacher_prompt_lengths: torch.Tensor | None = None  # (B,)
    sample_ids: torch.Tensor | None = None  # (B,) index of each sample in its split
    # Packed-row indices, computed on the host by `index_rows()` (in the data loader) so that losses gather
    # valid rows with `index_select` and never need a data-dependent shape (a host-device sync) on the device.
    student_rows: torch.Tensor | None = None  # (N_s,) flat positions b * T_s + s where the student label is valid
    teacher_rows: torch.Tensor | None = None  # (N_t,) flat positions b * T_t + t where the teacher label is valid
    aligned_rows: torch.Tensor | None = None  # (K, 2) (teacher row, student row) indices into the packed rows
    # Which loss parts this batch trains (set by policies): an on-policy step trains the CE on the dataset's
    # response and the KD on the student's own sample; the engine normalises each over its own tokens (spec §7.1).
    ce: bool = True
    kd: bool = True
    meta: dict = field(default_factory=dict)  # small host-side facts (e.g. which policy produced it)
    # Several teachers (`[[teachers]]`): each teacher's part of this batch, by name, in the job's order. The
    # teacher_* fields above then hold the first teacher's tokenisation of every sample, so single-teacher code
    # reads a batch as before; None for a job with one teacher.
    teachers: "dict[str, TeacherView] | None" = None

    def to(self, device: torch.device | str) -> "Batch":
        moved = _moved(self, device)
        if self.teachers:
            moved.teachers = {name: view.to(device) for name, view in self.teachers.items()}
        return moved

    @property
    def size(self) -> int:
        return int(self.student_input_ids.shape[0])

    def index_rows(self) -> "Batch":
        """Fill `student_rows`, `teacher_rows` and `aligned_rows` from the labels and the alignment (host side)."""
        s_valid = (self.student_labels != IGNORE_INDEX).reshape(-1)
        t_valid = (self.teacher_labels != IGNORE_INDEX).reshape(-1)
        self.student_rows = torch.nonzero(s_valid).reshape(-1)
        self.teacher_rows = torch.nonzero(t_valid).reshape(-1)
        if self.alignment is not None:
            a = self.alignment.to(torch.int64).reshape(-1, 3)
            t_flat = a[:, 0] * self.teacher_labels.shape[1] + a[:, 1]
            s_flat = a[:, 0] * self.student_labels.shape[1] + a[:, 2]
            # Row index of a valid position = number of valid positions before it.
            t_rank = torch.cumsum(t_valid.to(torch.int64), 0) - 1
            s_rank = torch.cumsum(s_valid.to(torch.int64), 0) - 1
            keep = t_valid[t_flat] & s_valid[s_flat]  # an aligned pair must sit on two valid labels
            self.aligned_rows = torch.stack([t_rank[t_flat[keep]], s_rank[s_flat[keep]]], dim=1)
        return self

    def num_student_tokens(self) -> int:
        """Valid student label tokens (a host-side count, used once per step for the loss denominator)."""
        return int((self.student_labels != IGNORE_INDEX).sum())


@dataclass
class ServedGroup:
    """Samples of a micro-batch served by the same set of teachers, as one teacher sees them: that teacher's
    weight on them (normalised over the set) and the sub-batch a single-teacher objective computes on."""

    weight: float  # weight_i / sum of the weights of the teachers that serve these samples
    batch: Batch  # the samples alone: student fields of the parent batch (same width), this teacher's fields
    samples: torch.Tensor  # (m,) positions of the samples in the parent batch (to select the student's hidden states)
    signal_rows: torch.Tensor | None = None  # (R_g,) rows of the view's teacher signal for these samples; None: all

    def to(self, device: torch.device | str) -> "ServedGroup":
        moved = _moved(self, device)
        moved.batch = self.batch.to(device)
        return moved


@dataclass
class TeacherView:
    """One teacher's part of a multi-teacher micro-batch (`Batch.teachers`): the samples it serves, tokenised and
    aligned for it (`batch`, the batch its signal is asked for), split into groups of equal weight."""

    batch: Batch  # served samples: student fields of the parent batch, this teacher's ids, labels, alignment, rows
    samples: torch.Tensor  # (n,) positions of the served samples in the parent batch
    groups: list[ServedGroup] = field(default_factory=list)

    def to(self, device: torch.device | str) -> "TeacherView":
        return TeacherView(self.batch.to(device), self.samples.to(device), [g.to(device) for g in self.groups])


@dataclass(frozen=True)
class SignalRequest:
    """What an objective needs from the teacher, for the rows where the teacher label is valid."""

    hidden_states: bool = False  # last-layer hidden states (the input of the LM head)
    top_k: int = 0  # top-k ids and log-probabilities plus the tail log-mass; 0 = none
    logits: bool = False  # dense logits (only sensible for small vocabularies or in-process teachers)

    def merge(self, other: "SignalRequest") -> "SignalRequest":
        return SignalRequest(
            hidden_states=self.hidden_states or other.hidden_states,
            top_k=max(self.top_k, other.top_k),
            logits=self.logits or other.logits,
        )

    @property
    def empty(self) -> bool:
        return not (self.hidden_states or self.top_k or self.logits)


@dataclass
class TeacherSignal:
    """A teacher's answer for the requested rows of a batch of teacher ids.

    Rows are the positions with `row_mask` true, in row-major (batch, position) order; `rows_per_sequence`
    gives how many belong to each sequence. Row `r` is the teacher's prediction of the token after the
    position it stands for.
    """

    rows_per_sequence: torch.Tensor  # (B,) int64
    hidden_states: torch.Tensor | None = None  # (R, d_t)
    topk_ids: torch.Tensor | None = None  # (R, k) int64
    topk_logprobs: torch.Tensor | None = None  # (R, k) float32
    tail_logmass: torch.Tensor | None = None  # (R,) float32: log of the probability outside the top-k
    logits: torch.Tensor | None = None  # (R, V_t)
    fingerprint: str = ""
    timings: dict = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return int(self.rows_per_sequence.sum())

    def to(self, device: torch.device | str) -> "TeacherSignal":
        return _moved(self, device)


@dataclass
class LossTerms:
    """An objective's result for one micro-batch: its loss parts, *unweighted*.

    `parts[name]` is the differentiable sum of one loss part over the micro-batch's tokens: `"ce"` is the gold
    cross-entropy, every other part (`kd`, `kd_student_space`, `projector_ce`, ...) belongs to the
    distillation side. The engine alone weights them (`1 - kd_rate` and `kd_rate`, a split step's scales, the
    step's global token count: `dskd.kit.LossWeights`), sums them into the loss and calls backward once.
    `counts[name]` is the number of tokens a part or metric was summed over (its log line is the mean);
    `metrics[name]` holds detached sums that are logged but not trained (agreement counts, accepted pairs).
    """

    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def sums(self) -> dict[str, torch.Tensor]:
        """Every logged sum, detached: the parts, then the metrics."""
        return {**{name: value.detach() for name, value in self.parts.items()}, **self.metrics}


@dataclass
class SparseTeacher:
    """A teacher distribution given by its top-k entries and the log of the mass outside them.

    Passed to a divergence in place of dense teacher logits when the divergence declares
    `accepts_sparse_teacher = True`. Log-probabilities are at temperature 1 (the teacher's own).
    """

    ids: torch.Tensor  # (N, k) int64, student-vocabulary ids (the caller maps teacher ids if needed)
    logprobs: torch.Tensor  # (N, k) float32
    tail_logmass: torch.Tensor  # (N,) float32

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.ids.shape[0]), int(self.ids.shape[1]))
