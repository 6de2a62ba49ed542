"""Forward and reverse KL with a sparse (top-k + tail) teacher, against a float64 numpy computation over
the k + 1 buckets (the k ids and one "rest" bucket), and against the dense divergence when k = vocabulary.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dskd import SparseTeacher
from dskd.errors import DivergenceError, DskdError
from dskd.plugins.divergences import (
    adaptive_kl,
    forward_kl,
    generalized_jsd,
    js,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    tvd,
)

SPARSE = {"forward_kl": forward_kl.forward_kl, "reverse_kl": reverse_kl.reverse_kl}
DENSE_ONLY = [
    js.js,
    tvd.tvd,
    skew_forward_kl.skew_forward_kl,
    skew_reverse_kl.skew_reverse_kl,
    adaptive_kl.adaptive_kl,
    generalized_jsd.generalized_jsd,
]


def bucket_reference(name, student_logits, ids, teacher_logprobs, tail_logmass):
    """Divergence over k + 1 buckets in float64, one row and one bucket at a time."""
    z = student_logits.detach().double().numpy()
    out = []
    for n in range(z.shape[0]):
        ps = np.exp(z[n] - z[n].max())
        ps /= ps.sum()
        chosen = ids[n].tolist()
        rest = [v for v in range(z.shape[1]) if v not in chosen]
        s_buckets = [ps[v] for v in chosen] + [ps[rest].sum()]  # the rest summed directly, not 1 - sum
        t_buckets = [math.exp(x) for x in teacher_logprobs[n].tolist()] + [math.exp(float(tail_logmass[n]))]
        if name == "forward_kl":
            out.append(sum(t * math.log(t / s) for s, t in zip(s_buckets, t_buckets) if t > 0 and s > 0))
        else:
            out.append(sum(s * math.log(s / t) for s, t in zip(s_buckets, t_buckets) if t > 0 and s > 0))
    return np.array(out)


def sparse_teacher(teacher_logits, k, *, shuffle_seed=0):
    """Top-k of a teacher row (ids in shuffled order) with float64-exact log-probabilities and tail mass."""
    lt = torch.log_softmax(teacher_logits.double(), -1)
    ids = torch.topk(lt, k, dim=-1).indices
    g = torch.Generator().manual_seed(shuffle_seed)
    ids = ids[:, torch.randperm(k, generator=g)]  # the buckets must not depend on the ids being sorted
    top = lt.gather(-1, ids)
    tail = torch.log1p(-top.exp().sum(-1)) if k < teacher_logits.shape[1] else torch.full((lt.shape[0],), -math.inf)
    return SparseTeacher(ids=ids, logprobs=top.float(), tail_logmass=tail.float())


def logits(n=4, v=12, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale, torch.randn(n, v, generator=g) * scale


@pytest.mark.parametrize("name", sorted(SPARSE))
@pytest.mark.parametrize("k", [1, 3, 11])
def test_sparse_kl_equals_kl_over_top_k_plus_rest_bucket(name, k):
    s, t = logits(seed=k)
    teacher = sparse_teacher(t, k)
    out = SPARSE[name](s, teacher)
    assert out.dtype == torch.float32 and out.shape == (4,)
    expected = bucket_reference(name, s, teacher.ids, teacher.logprobs.double(), teacher.tail_logmass.double())
    np.testing.assert_allclose(out.numpy(), expected, rtol=2e-5, atol=1e-6)
    assert (expected > 1e-3).all()


@pytest.mark.parametrize("name", sorted(SPARSE))
def test_sparse_kl_with_every_id_equals_dense_kl(name):
    s, t = logits(seed=20)
    teacher = sparse_teacher(t, t.shape[1])
    torch.testing.assert_close(SPARSE[name](s, teacher), SPARSE[name](s, t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(SPARSE))
def test_student_rest_bucket_is_exact_when_top_k_holds_nearly_all_student_mass(name):
    # The student puts ~1 - 1e-13 of its mass on the top-k ids: `1 - sum` in float32 would round the rest
    # bucket to 0 (or to noise), while the teacher keeps 30 % of its mass in the tail.
    s = torch.full((1, 8), -30.0)
    s[0, :3] = 0.0
    teacher = SparseTeacher(
        ids=torch.tensor([[0, 1, 2]]),
        logprobs=torch.tensor([[0.4, 0.2, 0.1]]).log(),
        tail_logmass=torch.tensor([0.3]).log(),
    )
    out = SPARSE[name](s, teacher)
    expected = bucket_reference(name, s, teacher.ids, teacher.logprobs.double(), teacher.tail_logmass.double())
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5)
    if name == "forward_kl":
        assert out.item() > 8  # 0.3 * (log 0.3 - log(5 e^-30 / 3)) dominates


@pytest.mark.parametrize("name", sorted(SPARSE))
def test_sparse_kl_student_gradient_matches_finite_differences(name):
    s, t = logits(n=2, v=6, seed=21)
    teacher = sparse_teacher(t, 2)
    s.requires_grad_(True)
    weights = torch.tensor([0.8, -1.7])
    (SPARSE[name](s, teacher) * weights).sum().backward()
    base, h = s.detach().double(), 1e-6
    lp, tail = teacher.logprobs.double(), teacher.tail_logmass.double()
    numeric = torch.zeros_like(base)
    for idx in np.ndindex(tuple(base.shape)):
        up, down = base.clone(), base.clone()
        up[idx] += h
        down[idx] -= h
        diff = bucket_reference(name, up, teacher.ids, lp, tail) - bucket_reference(name, down, teacher.ids, lp, tail)
        numeric[idx] = float(diff @ weights.double().numpy()) / (2 * h)
    torch.testing.assert_close(s.grad.double(), numeric, atol=3e-5, rtol=0)
    assert numeric.abs().max() > 1e-2


@pytest.mark.parametrize("name", sorted(SPARSE))
def test_sparse_kl_masks_minus_inf_student_entries_and_empty_tail(name):
    s, t = logits(seed=22)
    teacher = sparse_teacher(t, t.shape[1])  # tail log-mass -inf
    s[0, teacher.ids[0, 0]] = -math.inf
    s.requires_grad_(True)
    out = SPARSE[name](s, teacher)
    expected = bucket_reference(name, s, teacher.ids, teacher.logprobs.double(), teacher.tail_logmass.double())
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=2e-5, atol=1e-6)
    out.sum().backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", sorted(SPARSE))
def test_student_with_no_mass_outside_top_k_gets_finite_gradients(name):
    # Every student entry outside the k ids is masked: the student's rest bucket is empty (log 0), and its
    # log-sum-exp must not send NaN back through the softmax of the row.
    s, t = logits(seed=26)
    teacher = sparse_teacher(t, 4)
    outside = torch.ones_like(s, dtype=torch.bool).scatter(-1, teacher.ids, False)
    s = s.masked_fill(outside, -math.inf).requires_grad_(True)
    out = SPARSE[name](s, teacher)
    expected = bucket_reference(name, s, teacher.ids, teacher.logprobs.double(), teacher.tail_logmass.double())
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=2e-5, atol=1e-6)
    out.sum().backward()
    assert torch.isfinite(s.grad).all() and (s.grad[outside] == 0).all() and s.grad.abs().max() > 1e-2


@pytest.mark.parametrize("name", sorted(SPARSE))
def test_sparse_teacher_with_temperature_other_than_one_is_refused(name):
    s, t = logits(seed=23)
    with pytest.raises(ValueError, match="temperature 1.*server") as info:
        SPARSE[name](s, sparse_teacher(t, 3), temperature=2.0)
    assert isinstance(info.value, DskdError) and "\n" not in str(info.value)


@pytest.mark.parametrize("name", sorted(SPARSE))
def test_sparse_teacher_with_wrong_shapes_is_refused(name):
    s, t = logits(seed=24)
    teacher = sparse_teacher(t, 3)
    bad = SparseTeacher(ids=teacher.ids[:3], logprobs=teacher.logprobs[:3], tail_logmass=teacher.tail_logmass[:3])
    with pytest.raises(DivergenceError, match=r"ids \(3, 3\)"):
        SPARSE[name](s, bad)
    bad = SparseTeacher(ids=teacher.ids, logprobs=teacher.logprobs[:, :2], tail_logmass=teacher.tail_logmass)
    with pytest.raises(DivergenceError, match=r"logprobs \(4, 2\)"):
        SPARSE[name](s, bad)


def test_only_forward_and_reverse_kl_declare_sparse_support():
    assert forward_kl.forward_kl.accepts_sparse_teacher is True
    assert reverse_kl.reverse_kl.accepts_sparse_teacher is True
    assert not any(getattr(fn, "accepts_sparse_teacher", False) for fn in DENSE_ONLY)


@pytest.mark.parametrize("fn", DENSE_ONLY, ids=lambda fn: fn.__name__)
def test_dense_only_divergence_given_sparse_teacher_says_what_to_use(fn):
    s, t = logits(seed=25)
    with pytest.raises(DivergenceError, match=rf"{fn.__name__}.* needs dense teacher logits.*forward_kl or reverse_kl"):
        fn(s, sparse_teacher(t, 3))
