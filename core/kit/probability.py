"""Log-probabilities for divergences: dtype, temperature, masking of non-finite logits, sparse buckets.

Every built-in divergence turns its two logit tensors into a `PairedLogprobs` here, then sums per-vocabulary
terms with `PairedLogprobs.masked_sum`, so the numerics below are written once:

- **dtype.** Work happens in at least float32 (bf16 and fp16 are upcast; float64 stays float64 so that
  `torch.autograd.gradcheck` can check the divergences). Softmax over a large vocabulary in bf16 loses the
  tail, which is exactly where the divergences differ.
- **temperature.** Both logits are divided by `temperature` before the softmax (spec §2).
- **non-finite logits.** An entry whose logit is `-inf` has probability 0 (masked vocabulary entries); NaN
  and `+inf` entries are likewise left out of their own softmax, so one bad entry cannot poison a row. A term
  at a vocabulary entry where the student's *or* the teacher's logit is non-finite contributes 0 (the v2
  reference's masking, spec §2). Rows that are masked everywhere give 0. Two rows with `-inf` in the same
  columns therefore give exactly the divergence over the remaining columns.
- **gradients.** Terms are computed from "safe" log-probabilities that hold 0 at masked entries, so no
  `0 * inf` ever reaches autograd: masked entries get a zero gradient, never NaN.
- **sparse teacher.** A `SparseTeacher` (top-k plus tail mass) becomes a distribution over k + 1 buckets
  (`sparse_buckets`), and the same term code runs on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch

from dskd.errors import DivergenceError
from dskd.types import SparseTeacher


@dataclass(frozen=True)
class PairedLogprobs:
    """Student and teacher log-probabilities over the same columns, `(N, V)` each (or `(N, k + 1)` buckets).

    Entries left out of a softmax hold `-inf` (NaN in a row left out entirely); `mask` is true where both
    sides are finite, i.e. where a term may contribute.
    """

    student: torch.Tensor
    teacher: torch.Tensor
    mask: torch.Tensor

    def safe(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(log p_s, log p_t)` with 0 at masked entries: finite everywhere, so terms and gradients are."""
        zero = torch.zeros((), dtype=self.student.dtype, device=self.student.device)
        return torch.where(self.mask, self.student, zero), torch.where(self.mask, self.teacher, zero)

    def masked_sum(self, terms: torch.Tensor) -> torch.Tensor:
        """Per-row sum of per-entry `terms (N, V)` over unmasked entries only: `(N,)`."""
        return torch.where(self.mask, terms, torch.zeros((), dtype=terms.dtype, device=terms.device)).sum(-1)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype divergences compute in: float32, or float64 when the input already is."""
    return torch.promote_types(dtype, torch.float32)


def check_temperature(temperature: float, divergence: str) -> None:
    """Raise a `DivergenceError` unless `temperature` is a positive finite number."""
    if isinstance(temperature, bool) or not isinstance(temperature, Real) or not (0 < temperature < math.inf):
        raise DivergenceError(
            f"divergence {divergence!r}: temperature must be a positive finite number, got {temperature!r}; "
            f"set [divergence] temperature to e.g. 1.0 or 2.0"
        )


def check_unit_interval(value: float, option: str, divergence: str) -> None:
    """Raise a `DivergenceError` naming `option` unless `0 <= value <= 1`."""
    if isinstance(value, bool) or not isinstance(value, Real) or not (0.0 <= value <= 1.0):
        raise DivergenceError(
            f"divergence {divergence!r}: option {option} must be a number in [0, 1], got {value!r}; "
            f"set [divergence] {option} inside that range"
        )


def tempered_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`log_softmax(logits / temperature)` over the last dimension, in `compute_dtype`, with non-finite
    logits left out of the softmax (their log-probability is `-inf`)."""
    z = logits.to(compute_dtype(logits.dtype))
    if temperature != 1:
        z = z / temperature
    # NaN and +inf are excluded like -inf rather than allowed to turn the whole row into NaN.
    if z.requires_grad and torch.is_grad_enabled():
        # `where`, whose backward is exactly 0 at the replaced entries (nan_to_num's multiplies the incoming
        # gradient by 0, which keeps the NaN that log_softmax's backward gives a row left out entirely).
        z = torch.where(torch.isfinite(z), z, torch.full((), -math.inf, dtype=z.dtype, device=z.device))
    else:  # one pass instead of isfinite + where (two passes and a bool buffer over rows x vocabulary)
        z = torch.nan_to_num(z, nan=-math.inf, posinf=-math.inf, neginf=-math.inf)
    return torch.log_softmax(z, dim=-1)


def check_dense_pair(student_logits: torch.Tensor, teacher_logits: torch.Tensor, divergence: str) -> None:
    """Raise a `DivergenceError` unless both logits are `(N, V)` of the same shape."""
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise DivergenceError(
            f"divergence {divergence!r}: student and teacher logits must both have shape (N, V), got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}; align and flatten rows first"
        )


def paired_logprobs(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | SparseTeacher,
    *,
    temperature: float,
    divergence: str,
    sparse_ok: bool = False,
) -> PairedLogprobs:
    """Check the inputs of a divergence and return its log-probabilities (dense, or sparse buckets)."""
    check_temperature(temperature, divergence)
    if isinstance(teacher_logits, SparseTeacher):
        if not sparse_ok:
            raise DivergenceError(
                f"divergence {divergence!r} needs dense teacher logits but got a SparseTeacher (top-k); "
                f"use forward_kl or reverse_kl with a top-k teacher, or ask the teacher for hidden states"
            )
        return sparse_buckets(student_logits, teacher_logits, temperature=temperature, divergence=divergence)
    check_dense_pair(student_logits, teacher_logits, divergence)
    student = tempered_logprobs(student_logits, temperature)
    teacher = tempered_logprobs(teacher_logits, temperature)
    dtype = torch.promote_types(student.dtype, teacher.dtype)
    student, teacher = student.to(dtype), teacher.to(dtype)
    return PairedLogprobs(student, teacher, torch.isfinite(student) & torch.isfinite(teacher))


def sparse_buckets(
    student_logits: torch.Tensor, teacher: SparseTeacher, *, temperature: float, divergence: str
) -> PairedLogprobs:
    """Student and teacher log-probabilities over k + 1 buckets: the teacher's top-k ids, then the rest.

    The teacher's rest bucket is its tail log-mass; the student's is `log(1 - sum_k p_s)`, computed as the
    log-sum-exp of the student's log-probabilities outside the k ids, which stays exact when the top-k holds
    almost all the mass (`log1p(-sum)` would return the log of a rounding error there). The k ids must be
    distinct. Top-k log-probabilities cannot be re-tempered exactly (the rest of the distribution is gone),
    so the temperature must already have been applied by whoever produced them.
    """
    if temperature != 1:
        raise DivergenceError(
            f"divergence {divergence!r}: a sparse (top-k) teacher needs temperature 1, got {temperature!r}; "
            f"top-k log-probabilities cannot be re-tempered exactly, so have the teacher server apply the "
            f"temperature and pass temperature=1.0 here"
        )
    n = student_logits.shape[0] if student_logits.dim() == 2 else -1
    if (
        student_logits.dim() != 2
        or teacher.ids.dim() != 2
        or teacher.ids.shape != teacher.logprobs.shape
        or tuple(teacher.tail_logmass.shape) != (n,)
        or teacher.ids.shape[0] != n
    ):
        raise DivergenceError(
            f"divergence {divergence!r}: sparse teacher must have ids and logprobs of shape (N, k) and "
            f"tail_logmass of shape (N,) for student logits (N, V); "
            f"got student {tuple(student_logits.shape)}, "
            f"ids {tuple(teacher.ids.shape)}, logprobs {tuple(teacher.logprobs.shape)}, "
            f"tail_logmass {tuple(teacher.tail_logmass.shape)}"
        )
    logp = tempered_logprobs(student_logits, 1.0)
    ids = teacher.ids.to(device=logp.device, dtype=torch.int64)
    top = logp.gather(-1, ids)
    rest = safe_logsumexp(logp.scatter(-1, ids, -math.inf), dim=-1)
    student = torch.cat([top, rest.unsqueeze(-1)], dim=-1)
    dtype = torch.promote_types(student.dtype, compute_dtype(teacher.logprobs.dtype))
    tail = teacher.tail_logmass.to(device=logp.device, dtype=dtype).unsqueeze(-1)
    teacher_buckets = torch.cat([teacher.logprobs.to(device=logp.device, dtype=dtype), tail], dim=-1)
    student = student.to(dtype)
    return PairedLogprobs(student, teacher_buckets, torch.isfinite(student) & torch.isfinite(teacher_buckets))


def safe_logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`logsumexp` that returns `-inf` for all-`-inf` slices with a zero (not NaN) gradient."""
    dead = ~torch.isfinite(x).any(dim=dim, keepdim=True)
    # torch's logsumexp backward computes exp(-inf - (-inf)) = NaN on such slices, even for a zero gradient.
    out = torch.logsumexp(torch.where(dead, torch.zeros_like(x), x), dim=dim, keepdim=True)
    return torch.where(dead, torch.full_like(out, -math.inf), out).squeeze(dim)


def kl_terms(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Per-entry terms `p (log p - log q)` of KL(p || q), from finite ("safe") log-probabilities."""
    return logp.exp() * (logp - logq)


def log_mixture(logp: torch.Tensor, logq: torch.Tensor, weight: float) -> torch.Tensor:
    """`log(weight * p + (1 - weight) * q)` in log space, exact at `weight` 0 and 1.

    `logaddexp` of shifted log-probabilities never forms `log(0)` of an underflowed sum, so the 0 * (-inf)
    of the reference's plain `log(q)` (spec §14.13) cannot happen.
    """
    if weight <= 0:
        return logq
    if weight >= 1:
        return logp
    return torch.logaddexp(logp + math.log(weight), logq + math.log1p(-weight))


# ---------------------------------------------------------------------------------------------------------
# Fused rows: the KL family with its student gradient computed in closed form, in the forward pass.
# ---------------------------------------------------------------------------------------------------------
#
# Through autograd, a divergence over (N, V) logits costs some thirty passes over rows x vocabulary (each
# where, exp, sub and mul forward, and their backward ops), and on a CPU those passes, not the matmuls of the
# LM heads, decide whether a chunked loss keeps up with a dense one. When only the student needs a gradient
# (the teacher's logits are data: the usual case, and TRL GKD's), the gradient has a closed form. Writing
# J = sum_v over unmasked entries of a term in (p_s, p_t), and `score = dJ / dp_s` (p_s taken as free),
#
#     dJ / dz_s = p_s * (score - <p_s, score>) / tau,
#
# with score = -p_t / p_s for KL(p_t || p_s) (so the gradient is (p_s * sum p_t - p_t) / tau, no division),
# log p_s - log p_t + 1 for KL(p_s || p_t), and (1 - beta)(log p_s - log m) for the generalised JSD. Entries
# left out of the sum (either side non-finite) have score 0, and the student's non-finite logits get p_s = 0,
# hence a zero gradient: exactly what autograd gives on the masked formulas above. So the forward pass does
# some fifteen in-place passes, keeps one (N, V) buffer for the backward (the gradient itself) and no graph,
# and the backward is one multiply by the incoming per-row gradient.


def fused_applies(student_logits: torch.Tensor, teacher_logits: object) -> bool:
    """Whether `fused_kl_rows` may stand in for the autograd formulas: dense teacher logits that need no
    gradient (a teacher's logits that are trained through, e.g. a projected teacher, take the autograd path)."""
    return isinstance(teacher_logits, torch.Tensor) and not (teacher_logits.requires_grad and torch.is_grad_enabled())


def fused_kl_rows(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float, beta: float, divergence: str
) -> torch.Tensor:
    """Per-row generalised JSD with weight `beta` on the teacher, `(N,)`: forward KL at `beta = 0`, reverse KL
    at `beta = 1` (the end-point limits, as `generalized_jsd` defines them), with the same masking and values
    as the autograd formulas, differentiable with respect to `student_logits` only (see the section comment)."""
    check_temperature(temperature, divergence)
    check_dense_pair(student_logits, teacher_logits, divergence)
    need_grad = student_logits.requires_grad and torch.is_grad_enabled()
    return _FusedKLRows.apply(student_logits, teacher_logits.detach(), float(temperature), float(beta), need_grad)


class _FusedKLRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, temperature, beta, need_grad):  # type: ignore[override]
        values, grad = _kl_rows(student_logits.detach(), teacher_logits, temperature, beta, need_grad)
        ctx.grad = grad
        ctx.dtype = student_logits.dtype
        return values

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows):  # type: ignore[override]
        # Out of place: a retained graph (gradcheck, `retain_graph=True`) may call this again.
        grad = (ctx.grad * grad_rows.unsqueeze(-1).to(ctx.grad.dtype)).to(ctx.dtype)
        return grad, None, None, None, None


def _kl_rows(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, beta: float, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(values (N,), dJ/dz_s (N, V) or None)`; every (N, V) op below is one pass, in place where it can be."""
    ls = tempered_logprobs(student_logits, temperature)
    lt = tempered_logprobs(teacher_logits, temperature)
    dtype = torch.promote_types(ls.dtype, lt.dtype)
    ls, lt = ls.to(dtype), lt.to(dtype)
    # Both sides finite: log-probabilities are <= 0, -inf or NaN (a row left out entirely), so their sum exceeds
    # -inf exactly then (one compare; isfinite is three passes on the CPU: abs, ne, eq).
    mask = torch.gt(ls + lt, -math.inf)
    zero = torch.zeros((), dtype=dtype, device=ls.device)
    minus_inf = torch.full((), -math.inf, dtype=dtype, device=ls.device)
    if beta <= 0:  # KL(p_t || p_s)
        diff = torch.sub(lt, ls)
        diff = torch.where(mask, diff, zero, out=diff)
        pt = torch.where(mask, lt, minus_inf, out=lt).exp_()  # 0 off the mask
        values = _row_dot(pt, diff)
        if not need_grad:
            return values, None
        del diff
        ps = _student_probs(ls)
        grad = ps.mul_(pt.sum(-1, keepdim=True)).sub_(pt)
    elif beta >= 1:  # KL(p_s || p_t)
        score = torch.sub(ls, lt)
        score = torch.where(mask, score, zero, out=score)
        del lt
        ps = _student_probs(ls)
        values = _row_dot(ps, score)
        if not need_grad:
            return values, None
        grad = _through_softmax(ps, score.add_(mask))
    else:
        ls0 = torch.where(mask, ls, zero)
        lt0 = torch.where(mask, lt, zero, out=lt)
        lm = log_mixture(lt0, ls0, beta)
        # Off the mask ls0 = lt0 = lm = 0, so every product below is 0 there without another where.
        teacher_part = _row_dot(lt0.exp(), lt0.sub_(lm))
        score = ls0.sub_(lm)
        del lt0, lm
        values = beta * teacher_part + (1 - beta) * _row_dot(torch.where(mask, ls, minus_inf).exp_(), score)
        if not need_grad:
            return values, None
        ps = _student_probs(ls)
        grad = _through_softmax(ps, score.mul_(1 - beta))
    if temperature != 1:
        grad.div_(temperature)
    return values, grad


def _student_probs(logp: torch.Tensor) -> torch.Tensor:
    """`exp(logp)` in place; a row left out entirely (NaN log-probabilities) gets probability 0, so no gradient."""
    return logp.exp_().nan_to_num_(nan=0.0)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row `sum_v a * b` without an (N, V) product buffer."""
    return torch.einsum("nv,nv->n", a, b)


def _through_softmax(ps: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """`ps * (score - <ps, score>)`, in place in `ps`: a gradient with respect to p_s taken to the logits."""
    return ps.mul_(score.sub_(_row_dot(ps, score).unsqueeze(-1)))
