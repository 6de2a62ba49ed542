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
    z = torch.where(torch.isfinite(z), z, torch.full((), -math.inf, dtype=z.dtype, device=z.device))
    return torch.log_softmax(z, dim=-1)


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
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise DivergenceError(
            f"divergence {divergence!r}: student and teacher logits must both have shape (N, V), got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}; align and flatten rows first"
        )
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
