"""Shared pieces of the dual-space objectives (DSKD v1, DSKDv2, CMA): least-squares maps between the two
models' head spaces, the shared vocabulary, and the packed-row inputs of an aligned batch.

Least squares (spec §5.1). For heads `S = W_s^T (d_s x V')` and `T = W_t^T (d_t x V')` restricted to a shared
vocabulary V', the map `Y = argmin ||Y S - T||_F` is `Y = T S^T (S S^T)^-1` when S has full row rank
(d_s <= V', the usual case). We solve it through the Gram matrix with a Cholesky factorisation in float64
(`d x d` work after one `d x V'` product) rather than an SVD pseudo-inverse of the `d x V'` matrix; when the
Gram matrix is singular (a rank-deficient head) we fall back to `torch.linalg.pinv`, which is the exact
minimum-norm least-squares solution either way. A head whose Gram matrix has a rounding-level pivot takes
the pinv path, where singular values below `SINGULAR_RTOL` of the largest count as zero (`_gram_cholesky`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dskd.errors import ModelError
from dskd.types import Batch, LossTerms, TeacherSignal

# Singular values below this fraction of the largest count as zero. Heads hold float32 or fewer digits, so a
# weaker direction is rounding, not signal; inverting it would put huge, meaningless components into the map.
SINGULAR_RTOL = 1e-5


def _gram_cholesky(x: torch.Tensor) -> torch.Tensor | None:
    """Cholesky factor of the float64 Gram matrix `x x^T`, or None when `x` is rank-deficient.

    An exactly singular Gram matrix (a dead or duplicated hidden unit) often survives the factorisation with
    a pivot at rounding level, and solving with that pivot adds large arbitrary components along the null
    directions instead of giving the minimum-norm solution. Every pivot is at least the smallest eigenvalue,
    so a tiny pivot is a reliable sign of a (numerically) singular matrix.
    """
    gram = x @ x.T
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        return None
    if float(factor.diagonal().square().min()) <= SINGULAR_RTOL**2 * float(gram.diagonal().max()):
        return None
    return factor


def least_squares_map(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`M (d_b x d_a)` minimising `||M @ source - target||_F` for `source (d_a x V')`, `target (d_b x V')`."""
    s = source.double()
    t = target.double()
    factor = _gram_cholesky(s)
    if factor is not None:
        # M = t s^T gram^-1  <=>  gram M^T = s t^T (gram is symmetric)
        m = torch.cholesky_solve(s @ t.T, factor).T
    else:
        m = t @ torch.linalg.pinv(s, rtol=SINGULAR_RTOL)
    return m.float()


def right_inverse_factor(target: torch.Tensor) -> torch.Tensor:
    """`Q (V' x d_b)` such that `A = source @ Q` minimises `||A @ target - source||_F` for any `source (d_a x V')`.

    This is `pinv(target)`; computing it once lets a map that follows a changing `source` (the student head
    during training) be refreshed with one matrix product per optimizer step.
    """
    t = target.double()
    factor = _gram_cholesky(t)
    if factor is not None:
        q = torch.cholesky_solve(t, factor).T  # t^T (t t^T)^-1
    else:
        q = torch.linalg.pinv(t, rtol=SINGULAR_RTOL)
    return q.float()


@dataclass(frozen=True)
class SharedVocabulary:
    """Paired ids of the tokens both vocabularies hold (the same text), in student-vocabulary order."""

    teacher_ids: torch.Tensor  # (V',) int64
    student_ids: torch.Tensor  # (V',) int64

    def __len__(self) -> int:
        return int(self.student_ids.shape[0])


def shared_vocabulary(
    teacher_size: int,
    student_size: int,
    vocab_map: torch.Tensor | None,
    *,
    limit: int = 0,
    own: torch.Tensor | None = None,
) -> SharedVocabulary:
    """The shared vocabulary: every id of identical vocabularies (`vocab_map is None`), otherwise the pairs
    (t, map[t]) with map[t] >= 0, one teacher id per student id, sorted by student id. Only ids below both
    tokenizers' sizes are used, so padded head rows never enter.

    Where several teacher ids have the student token's bytes, one marked in `own` (a `(V_t,)` bool: the
    teacher's own tokens, i.e. not SentencePiece byte-fallback pieces `<0xNN>`) is kept, then the lowest id:
    so "A" is fitted against the teacher's own "A", which it emits, not against `<0x41>`, which it emits only
    for bytes it has no piece for (docs/differences.md). Without `own`, the lowest id."""
    if vocab_map is None:
        n = min(teacher_size, student_size)
        ids = torch.arange(n)
        shared = SharedVocabulary(ids, ids.clone())
    else:
        vocab_map = vocab_map[:teacher_size].to(torch.int64).cpu()
        teacher = torch.nonzero((vocab_map >= 0) & (vocab_map < student_size)).reshape(-1)
        student = vocab_map[teacher]
        foreign = torch.zeros_like(teacher) if own is None else (~own.to(torch.bool).cpu()[teacher]).to(torch.int64)
        # By student id, then the teacher's own tokens first, then teacher id.
        order = torch.argsort((student * 2 + foreign) * (teacher_size + 1) + teacher)
        teacher, student = teacher[order], student[order]
        first = torch.ones_like(student, dtype=torch.bool)
        first[1:] = student[1:] != student[:-1]
        shared = SharedVocabulary(teacher[first], student[first])
    if limit and limit < len(shared):
        shared = SharedVocabulary(shared.teacher_ids[:limit], shared.student_ids[:limit])
    return shared


@dataclass
class PairedRows:
    """Packed rows of one micro-batch for a dual-space loss.

    `student_index`/`teacher_index` select the paired rows (aligned pairs, or every valid row when the
    vocabularies match) out of the packed valid rows of each model.
    """

    student_hidden: torch.Tensor  # (N_s, d_s) all valid student rows
    student_labels: torch.Tensor  # (N_s,)
    teacher_hidden: torch.Tensor  # (N_t, d_t) all valid teacher rows
    student_index: torch.Tensor | None  # (K,) into the student rows; None = identity (same vocabulary)
    teacher_index: torch.Tensor | None  # (K,) into the teacher rows


def paired_rows(
    batch: Batch,
    student_hidden: torch.Tensor,
    signal: TeacherSignal | None,
    *,
    same_vocab: bool,
    teacher_hidden_size: int,
    name: str,
) -> PairedRows:
    """Gather the packed rows, with host-side shape checks that name the problem instead of failing in torch."""
    if signal is None or signal.hidden_states is None:
        raise ModelError(f"objective {name} needs the teacher's hidden states, but the teacher sent none")
    t_hidden = signal.hidden_states
    if t_hidden.shape[-1] != teacher_hidden_size:
        raise ModelError(
            f"objective {name}: the teacher sent hidden states of size {t_hidden.shape[-1]} but its LM head expects "
            f"{teacher_hidden_size}; the server and its head do not belong together"
        )
    s_rows = batch.student_rows
    s_hidden = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, s_rows)
    labels = batch.student_labels.reshape(-1).index_select(0, s_rows)
    if same_vocab:
        if t_hidden.shape[0] != s_hidden.shape[0]:
            raise ModelError(
                f"objective {name}: the vocabularies match but the batch has {s_hidden.shape[0]} student and "
                f"{t_hidden.shape[0]} teacher tokens (the tokenizers split the text differently); use aligner eta"
            )
        return PairedRows(s_hidden, labels, t_hidden, None, None)
    if batch.aligned_rows is None:
        raise ModelError(f"objective {name} with different vocabularies needs an aligner (set aligner.name, e.g. eta)")
    pairs = batch.aligned_rows
    return PairedRows(s_hidden, labels, t_hidden, pairs[:, 1], pairs[:, 0])


@dataclass(frozen=True)
class DualSpaceSpec:
    """How a dual-space objective forms its terms (DSKD v1 and DSKDv2 differ only in these choices)."""

    projector_labels: str  # "gold": the student's gold tokens (v1); "teacher_top1": the teacher's argmax (v2)
    gate_student_kd: bool  # student-space KD only where the projected teacher keeps the teacher's top-1 (v2)
    student_space: bool = True  # L_t2s_kd + L_t2s_ce
    teacher_space: bool = True  # L_s2t_kd


def dual_space_terms(
    spec: DualSpaceSpec,
    rows: PairedRows,
    *,
    student_head,
    teacher_head,
    t2s: dict[str, torch.Tensor],
    s2t: dict[str, torch.Tensor],
    vocab_map: torch.Tensor | None,
    divergence,
    temperature: float,
    chunk_size: int,
) -> LossTerms:
    """Loss terms of DSKD (spec §4.3, §5.2, §6.4) over packed rows, chunked, with one global normaliser.

    Student space: `z_t2s = head_s(t2s(h_t))` with the student head detached; `projector_ce = CE(z_t2s, label)`
    trains t2s; `kd_student_space = d(z_s, sg(z_t2s))` trains the student (gated by agreement in v2).
    Teacher space: `z_s2t = head_t(s2t(h_s))` with the frozen teacher head; `kd_teacher_space = d(z_s2t, z_t)`
    with the configured divergence (v1's reference always used forward KL here, spec §14.11; we honour the
    configuration). Every term is a sum over tokens, weighted by the engine with the same global denominator
    D (spec §0): the reference's micro-batch-local normalisers (spec §14.10) would make the weight of KD
    against CE depend on how many tokens agree in each micro-batch. The engine forms
    `L = [(1-a) CE + a (t2s_kd + t2s_ce + s2t_kd)] / D`.

    `t2s`/`s2t` hold `weight` (and optionally `bias`) of linear maps; those that require grad are trained.
    With different vocabularies, `vocab_map` maps teacher ids to student ids (-1: none) and only pairs whose
    teacher top-1 maps ("accepted" pairs, spec §6.3) carry the KD and projector terms.
    """
    import torch.nn.functional as F

    from dskd.kit.chunked import chunked_parts  # local: keeps this module importable without the autograd helper
    from dskd.kit.objective import packed_ce_terms

    same_rows = rows.student_index is None
    if same_rows:
        kd_rows = {"h_s": rows.student_hidden, "h_t": rows.teacher_hidden, "labels": rows.student_labels}
    else:
        kd_rows = {
            "h_s": rows.student_hidden.index_select(0, rows.student_index),
            "h_t": rows.teacher_hidden.index_select(0, rows.teacher_index),
            "labels": rows.student_labels.index_select(0, rows.student_index),
        }
    shared = {f"s_{k}": v for k, v in student_head.tensors().items()}
    shared.update({f"t2s_{k}": v for k, v in t2s.items()})
    shared.update({f"s2t_{k}": v for k, v in s2t.items()})
    head_tensor_names = list(student_head.tensors())

    def chunk(r: dict, sh: dict):
        head_s = student_head.with_tensors({k: sh[f"s_{k}"] for k in head_tensor_names})
        head_s_frozen = head_s.detached()
        h_s, h_t = r["h_s"], r["h_t"].float()
        z_s = head_s.logits(h_s)
        z_t = teacher_head.logits(h_t)
        t_top = z_t.argmax(-1)
        if spec.projector_labels == "gold":
            label = r["labels"]
        else:
            label = t_top if vocab_map is None else vocab_map.index_select(0, t_top)
        valid = label >= 0
        stats = {}
        parts = {}
        if same_rows:
            parts["ce"] = F.cross_entropy(z_s, r["labels"], reduction="sum")
        if spec.student_space:
            z_t2s = head_s_frozen.logits(F.linear(h_t, sh["t2s_weight"], sh.get("t2s_bias")))
            t2s_ce = (F.cross_entropy(z_t2s, label.clamp_min(0), reduction="none") * valid).sum()
            agree = (z_t2s.argmax(-1) == label) & valid
            gate = agree if spec.gate_student_kd else valid
            parts["kd_student_space"] = (divergence(z_s, z_t2s.detach(), temperature=temperature) * gate).sum()
            parts["projector_ce"] = t2s_ce
            stats.update(n_gate=gate.sum().float(), t2s_agreement=agree.sum().float())
        if spec.teacher_space:
            h_s2t = F.linear(
                h_s.float(), sh["s2t_weight"].float(), None if sh.get("s2t_bias") is None else sh["s2t_bias"].float()
            )
            z_s2t = teacher_head.logits(h_s2t)
            parts["kd_teacher_space"] = (divergence(z_s2t, z_t, temperature=temperature) * valid).sum()
            s2t_top = z_s2t.argmax(-1)
            s2t_top = s2t_top if vocab_map is None else vocab_map.index_select(0, s2t_top)
            stats["s2t_agreement"] = ((s2t_top == z_s.argmax(-1)) & valid).sum().float()
        stats["n_valid"] = valid.sum().float()
        return parts, stats

    parts, stats = chunked_parts(chunk, kd_rows, shared, chunk_size=chunk_size)
    device = rows.student_hidden.device
    zero = torch.zeros((), device=device)
    if not same_rows:
        # Different vocabularies: the gold CE covers every student token, aligned or not.
        parts["ce"] = packed_ce_terms(student_head, rows.student_hidden, rows.student_labels, chunk_size).parts["ce"]
    n_valid = stats.pop("n_valid", zero)
    n_gate = stats.pop("n_gate", zero)
    # The share of paired rows whose teacher top-1 has a student token ("accepted", spec §6.3): with tokenizers
    # that share little, KD runs on few tokens, and this metric says so.
    metrics = {"accepted_pairs": n_valid, **stats}
    counts = {
        "ce": torch.tensor(float(rows.student_labels.shape[0]), device=device),
        "accepted_pairs": torch.tensor(float(kd_rows["h_s"].shape[0]), device=device),
    }
    if spec.student_space:
        counts.update(kd_student_space=n_gate, projector_ce=n_valid, t2s_agreement=n_valid)
    if spec.teacher_space:
        counts.update(kd_teacher_space=n_valid, s2t_agreement=n_valid)
    return LossTerms(parts=parts, counts=counts, metrics=metrics)
