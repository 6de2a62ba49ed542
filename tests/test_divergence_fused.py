"""The fused KL-family rows (`dskd.kit.fused_kl_rows`): a closed-form student gradient in place of autograd.

`forward_kl`, `reverse_kl`, `js` and `generalized_jsd` take this path whenever the teacher's logits need no
gradient. Checked here against a plain float64 autograd computation written from the formulas, against finite
differences (gradcheck, including masked entries), and against the divergences' own autograd path (a teacher
that requires grad) on masked vocabularies, NaN/inf entries and rows masked entirely.
"""

from __future__ import annotations

import math

import pytest
import torch

from dskd.errors import DivergenceError
from dskd.kit import fused_applies, fused_kl_rows
from dskd.plugins.divergences.forward_kl import forward_kl
from dskd.plugins.divergences.generalized_jsd import generalized_jsd
from dskd.plugins.divergences.js import js
from dskd.plugins.divergences.reverse_kl import reverse_kl

N, V = 6, 23
CASES = [
    ("forward_kl", lambda s, t, tau: forward_kl(s, t, temperature=tau), 0.0),
    ("reverse_kl", lambda s, t, tau: reverse_kl(s, t, temperature=tau), 1.0),
    ("js", lambda s, t, tau: js(s, t, temperature=tau), 0.5),
    ("generalized_jsd_0.2", lambda s, t, tau: generalized_jsd(s, t, temperature=tau, beta=0.2), 0.2),
    ("generalized_jsd_0", lambda s, t, tau: generalized_jsd(s, t, temperature=tau, beta=0.0), 0.0),
    ("generalized_jsd_1", lambda s, t, tau: generalized_jsd(s, t, temperature=tau, beta=1.0), 1.0),
]
IDS = [c[0] for c in CASES]


def plain_rows(s: torch.Tensor, t: torch.Tensor, tau: float, beta: float) -> torch.Tensor:
    """Textbook formulas on finite logits, through autograd (independent of dskd.kit)."""
    ls, lt = torch.log_softmax(s / tau, -1), torch.log_softmax(t / tau, -1)
    ps, pt = ls.exp(), lt.exp()
    if beta == 0:
        return (pt * (lt - ls)).sum(-1)
    if beta == 1:
        return (ps * (ls - lt)).sum(-1)
    lm = torch.log(beta * pt + (1 - beta) * ps)
    return beta * (pt * (lt - lm)).sum(-1) + (1 - beta) * (ps * (ls - lm)).sum(-1)


def logits(seed: int, dtype=torch.float64, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(N, V, generator=gen, dtype=dtype) * scale,
        torch.randn(N, V, generator=gen, dtype=dtype) * scale,
    )


def masked_logits(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits with a masked vocabulary in both, entries masked on one side only, NaN and +inf, a row masked
    entirely on the student side and one on the teacher side."""
    s, t = logits(seed)
    s[:, :3] = t[:, :3] = -math.inf  # a masked vocabulary
    s[0, 5] = -math.inf  # the student alone
    t[1, 6] = -math.inf  # the teacher alone
    s[2, 7], t[2, 8], s[3, 9] = math.nan, math.inf, math.inf
    s[4] = -math.inf
    t[5] = -math.inf
    return s, t


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize(("name", "divergence", "beta"), CASES, ids=IDS)
def test_values_and_student_gradient_match_the_textbook_formula(name, divergence, beta, tau):
    s, t = logits(1)
    # float32: a few ulps of the row sums (the autograd formulas are no closer to the float64 values).
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 4e-6)):
        s_fused = s.to(dtype).clone().requires_grad_(True)
        s_plain = s.to(dtype).double().clone().requires_grad_(True)  # the same (rounded) logits, in float64
        t = t.to(dtype).double()
        out = divergence(s_fused, t.to(dtype), tau)
        assert out.grad_fn is not None and type(out.grad_fn).__name__.startswith("_FusedKLRows")
        weights = torch.linspace(0.5, 2.0, N, dtype=torch.float64)
        (out.double() * weights).sum().backward()
        ref = plain_rows(s_plain, t, tau, beta)
        (ref * weights).sum().backward()
        assert out.dtype == dtype and out.shape == (N,)
        assert (out.double() - ref).abs().max() <= tol * max(1.0, float(ref.abs().max()))
        assert (s_fused.grad.double() - s_plain.grad).abs().max() <= tol * float(s_plain.grad.abs().max())


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize(("name", "divergence", "beta"), CASES, ids=IDS)
def test_masked_entries_match_the_autograd_path(name, divergence, beta, tau):
    s, t = masked_logits(2)
    s_fused = s.clone().requires_grad_(True)
    s_auto = s.clone().requires_grad_(True)
    t_auto = t.clone().requires_grad_(True)  # a teacher that needs a gradient takes the autograd formulas
    fused = divergence(s_fused, t, tau)
    auto = divergence(s_auto, t_auto, tau)
    assert type(fused.grad_fn).__name__.startswith("_FusedKLRows")
    assert not type(auto.grad_fn).__name__.startswith("_FusedKLRows")
    torch.testing.assert_close(fused, auto, rtol=1e-12, atol=1e-12)
    assert fused[4] == 0 and fused[5] == 0  # rows masked entirely give 0
    weights = torch.arange(1.0, N + 1, dtype=torch.float64)
    (fused * weights).sum().backward()
    (auto * weights).sum().backward()
    assert torch.isfinite(s_fused.grad).all()
    torch.testing.assert_close(s_fused.grad, s_auto.grad, rtol=1e-10, atol=1e-12)
    assert (s_fused.grad[4] == 0).all() and (s_fused.grad[:, :3] == 0).all()  # no gradient into masked logits


@pytest.mark.parametrize(("name", "divergence", "beta"), CASES, ids=IDS)
def test_student_gradient_passes_finite_differences(name, divergence, beta):
    s, t = masked_logits(3)
    s = torch.where(torch.isfinite(s), s, torch.full((), -math.inf, dtype=s.dtype))  # gradcheck perturbs finite
    s[2, 7] = 0.3  # gradcheck's finite differences need finite entries where it perturbs
    s = s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: divergence(x, t, 1.5), (s,), eps=1e-6, atol=1e-7)


def test_half_precision_student_gets_its_own_dtype_back_and_float32_values():
    s, t = logits(4, dtype=torch.float32)
    s16 = s.to(torch.bfloat16).requires_grad_(True)
    out = forward_kl(s16, t.to(torch.bfloat16), temperature=2.0)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert s16.grad.dtype == torch.bfloat16
    ref = s.to(torch.bfloat16).float().requires_grad_(True)
    plain_rows(ref.double(), t.to(torch.bfloat16).double(), 2.0, 0.0).sum().backward()
    torch.testing.assert_close(s16.grad.float(), ref.grad.float(), rtol=2e-2, atol=2e-3)


def test_no_gradient_is_computed_without_a_student_that_needs_one():
    s, t = logits(5)
    assert forward_kl(s, t).grad_fn is None
    s.requires_grad_(True)
    with torch.no_grad():
        assert forward_kl(s, t).grad_fn is None
    assert fused_applies(s, t) and not fused_applies(s, t.clone().requires_grad_(True))


def test_bad_shapes_and_temperatures_fail_with_a_sentence():
    s, t = logits(6)
    with pytest.raises(DivergenceError, match=r"shape \(N, V\)"):
        fused_kl_rows(s, t[:, :-1], temperature=1.0, beta=0.0, divergence="forward_kl")
    with pytest.raises(DivergenceError, match="temperature must be a positive finite number"):
        fused_kl_rows(s, t, temperature=0.0, beta=0.0, divergence="forward_kl")
