"""The eight built-in divergences against independent float64 computations (numpy loops over the
vocabulary, hand-worked examples, closed-form gradients, finite differences), plus masking, dtypes, options
and registration.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
from dskd.registry import load_registry, option_defaults

MODULES = [forward_kl, reverse_kl, js, tvd, skew_forward_kl, skew_reverse_kl, adaptive_kl, generalized_jsd]
FUNCS = {m.__name__.rsplit(".", 1)[1]: getattr(m, m.__name__.rsplit(".", 1)[1]) for m in MODULES}
NAMES = sorted(FUNCS)
DEFAULTS = {
    "skew_forward_kl": {"lam": 0.1},
    "skew_reverse_kl": {"lam": 0.1},
    "adaptive_kl": {"mu": 0.5},
    "generalized_jsd": {"beta": 0.5},
}
# Non-default options, so a plugin that ignores its option fails the value tests.
OPTIONS = {
    "skew_forward_kl": {"lam": 0.3},
    "skew_reverse_kl": {"lam": 0.3},
    "adaptive_kl": {"mu": 0.35},
    "generalized_jsd": {"beta": 0.2},
}


# ---------------------------------------------------------------------------------------------------------
# Independent float64 reference: plain numpy, one vocabulary entry at a time, written from spec §2 / §2.1.
# ---------------------------------------------------------------------------------------------------------


def ref_logsoftmax(z: np.ndarray) -> np.ndarray:
    """log-softmax of one row over its finite entries; -inf elsewhere."""
    out = np.full(z.shape, -np.inf)
    keep = np.isfinite(z)
    if keep.any():
        m = z[keep].max()
        out[keep] = z[keep] - m - math.log(np.exp(z[keep] - m).sum())
    return out


def ref_row(name, ls, lt, weights=None, **opts):
    """One row's divergence from log-probabilities `ls`, `lt`; `weights` fixes AKL's (head, tail) weights."""
    ps, pt = np.exp(ls), np.exp(lt)
    valid = [v for v in range(len(ls)) if np.isfinite(ls[v]) and np.isfinite(lt[v])]
    fkl = sum(pt[v] * (lt[v] - ls[v]) for v in valid)
    rkl = sum(ps[v] * (ls[v] - lt[v]) for v in valid)
    if name == "forward_kl":
        return fkl
    if name == "reverse_kl":
        return rkl
    if name == "tvd":
        return 0.5 * sum(abs(pt[v] - ps[v]) for v in valid)
    if name in ("js", "generalized_jsd"):
        beta = opts.get("beta", 0.5)
        if beta == 0:
            return fkl
        if beta == 1:
            return rkl
        total = 0.0
        for v in valid:
            m = beta * pt[v] + (1 - beta) * ps[v]
            total += beta * pt[v] * math.log(pt[v] / m) + (1 - beta) * ps[v] * math.log(ps[v] / m)
        return total
    if name == "skew_forward_kl":
        lam = opts["lam"]
        return sum(pt[v] * math.log(pt[v] / (lam * pt[v] + (1 - lam) * ps[v])) for v in valid)
    if name == "skew_reverse_kl":
        lam = opts["lam"]
        return sum(ps[v] * math.log(ps[v] / ((1 - lam) * pt[v] + lam * ps[v])) for v in valid)
    if name == "adaptive_kl":
        w_head, w_tail = weights if weights is not None else akl_weights(ls, lt, opts["mu"])
        return w_head * fkl + w_tail * rkl
    raise KeyError(name)


def akl_weights(ls, lt, mu):
    ps, pt = np.exp(ls), np.exp(lt)
    order = sorted(range(len(pt)), key=lambda v: (pt[v], v))  # ascending, ties in vocabulary order
    cumulative, g_head, g_tail = 0.0, 0.0, 0.0
    for v in order:
        cumulative += pt[v]
        gap = abs(pt[v] - ps[v]) if np.isfinite(ls[v]) and np.isfinite(lt[v]) else 0.0
        if cumulative <= mu:
            g_tail += gap
        else:
            g_head += gap
    if g_head + g_tail == 0:
        return 0.0, 0.0
    return g_head / (g_head + g_tail), g_tail / (g_head + g_tail)


def reference(name, student, teacher, tau, weights=None, **opts):
    s = np.asarray(student.detach().double().numpy()) / tau
    t = np.asarray(teacher.detach().double().numpy()) / tau
    rows = []
    for n in range(s.shape[0]):
        w = None if weights is None else weights[n]
        rows.append(ref_row(name, ref_logsoftmax(s[n]), ref_logsoftmax(t[n]), w, **opts))
    return np.array(rows)


def logits(n=4, v=9, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale, torch.randn(n, v, generator=g) * scale


# ---------------------------------------------------------------------------------------------------------
# Values and gradients
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("options", ["default", "custom"])
def test_divergence_matches_float64_reference(name, tau, options):
    opts = (DEFAULTS if options == "default" else OPTIONS).get(name, {})
    s, t = logits(seed=1)
    out = FUNCS[name](s, t, temperature=tau, **opts)
    assert out.dtype == torch.float32 and out.shape == (4,)
    expected = reference(name, s, t, tau, **opts)
    np.testing.assert_allclose(out.numpy(), expected, rtol=2e-5, atol=1e-6)
    assert (expected > 1e-3).all()  # the comparison is not between two near-zero numbers


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("name", NAMES)
def test_gradients_match_finite_differences_of_reference(name, tau):
    """Gradients for student and teacher logits (neither detached) against central differences of the
    numpy reference in float64. AKL's weights are detached by definition, so the reference fixes them."""
    opts = OPTIONS.get(name, {})
    s, t = logits(n=3, v=7, seed=2)
    s.requires_grad_(True)
    t.requires_grad_(True)
    row_weights = torch.tensor([0.7, -1.3, 2.1])
    (FUNCS[name](s, t, temperature=tau, **opts) * row_weights).sum().backward()

    s64, t64 = s.detach().double().numpy(), t.detach().double().numpy()
    fixed = None
    if name == "adaptive_kl":
        fixed = [akl_weights(ref_logsoftmax(s64[n] / tau), ref_logsoftmax(t64[n] / tau), opts["mu"]) for n in range(3)]

    def objective(a, b):
        return float(
            reference(name, torch.from_numpy(a), torch.from_numpy(b), tau, fixed, **opts) @ row_weights.double().numpy()
        )

    h = 1e-6
    for which, base, grad in (("student", s64, s.grad), ("teacher", t64, t.grad)):
        numeric = np.zeros_like(base)
        for idx in np.ndindex(base.shape):
            up, down = base.copy(), base.copy()
            up[idx] += h
            down[idx] -= h
            if which == "student":
                numeric[idx] = (objective(up, t64) - objective(down, t64)) / (2 * h)
            else:
                numeric[idx] = (objective(s64, up) - objective(s64, down)) / (2 * h)
        np.testing.assert_allclose(grad.numpy(), numeric, atol=3e-5, err_msg=f"{which} gradient")
        assert np.abs(numeric).max() > 1e-2


@pytest.mark.parametrize("name", [n for n in NAMES if n != "adaptive_kl"])  # AKL's detached weights are not
def test_gradcheck_in_float64(name):  # the derivative of its value
    s, t = logits(n=3, v=6, seed=3)
    s = s.double().requires_grad_(True)
    t = t.double().requires_grad_(True)
    fn = FUNCS[name]
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, temperature=2.0, **OPTIONS.get(name, {})), (s, t))


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_forward_and_reverse_kl_gradients_equal_closed_forms(tau):
    s, t = logits(seed=4)
    s.requires_grad_(True)
    t.requires_grad_(True)
    ls = torch.log_softmax(s.detach().double() / tau, -1)
    lt = torch.log_softmax(t.detach().double() / tau, -1)
    ps, pt = ls.exp(), lt.exp()
    fkl = (pt * (lt - ls)).sum(-1, keepdim=True)
    rkl = (ps * (ls - lt)).sum(-1, keepdim=True)

    forward_kl.forward_kl(s, t, temperature=tau).sum().backward()
    torch.testing.assert_close(s.grad.double(), (ps - pt) / tau, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(t.grad.double(), pt * (lt - ls - fkl) / tau, atol=1e-6, rtol=1e-5)

    s.grad, t.grad = None, None
    reverse_kl.reverse_kl(s, t, temperature=tau).sum().backward()
    torch.testing.assert_close(s.grad.double(), ps * (ls - lt - rkl) / tau, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(t.grad.double(), (pt - ps) / tau, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_divergence_is_zero_for_identical_distributions(name):
    s, _ = logits(seed=5)
    s.requires_grad_(True)
    out = FUNCS[name](s, s.detach().clone(), temperature=2.0, **OPTIONS.get(name, {}))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.zeros(4), atol=1e-6, rtol=0)
    out.sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().max() < 1e-5


def test_adaptive_kl_is_exactly_zero_not_nan_for_identical_inputs():
    s, _ = logits(seed=6)
    out = adaptive_kl.adaptive_kl(s, s.clone())
    assert torch.equal(out, torch.zeros(4))


# ---------------------------------------------------------------------------------------------------------
# Masked and non-finite logits
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_shared_minus_inf_columns_give_divergence_over_remaining_columns(name):
    opts = OPTIONS.get(name, {})
    s, t = logits(seed=7)
    masked = [1, 4, 8]
    keep = [v for v in range(9) if v not in masked]
    s_inf, t_inf = s.clone(), t.clone()
    s_inf[:, masked] = -math.inf
    t_inf[:, masked] = -math.inf
    s_inf.requires_grad_(True)
    t_inf.requires_grad_(True)
    out = FUNCS[name](s_inf, t_inf, temperature=2.0, **opts)
    torch.testing.assert_close(out, FUNCS[name](s[:, keep], t[:, keep], temperature=2.0, **opts))
    np.testing.assert_allclose(
        out.detach().numpy(), reference(name, s[:, keep], t[:, keep], 2.0, **opts), rtol=2e-5, atol=1e-6
    )
    out.sum().backward()
    for grad in (s_inf.grad, t_inf.grad):
        assert torch.isfinite(grad).all()
        assert (grad[:, masked] == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_many_masked_columns_add_exactly_nothing(name):
    # A padded vocabulary masks thousands of columns; a rounding residue of 1e-8 per masked entry (e.g. a
    # log-mixture of two zeros) would add up to ~1e-4 here.
    opts = OPTIONS.get(name, {})
    s, t = logits(n=3, v=4000, seed=18)
    s[:, 10:] = -math.inf
    t[:, 10:] = -math.inf
    out = FUNCS[name](s, t, temperature=2.0, **opts)
    np.testing.assert_allclose(out.numpy(), reference(name, s[:, :10], t[:, :10], 2.0, **opts), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_terms_at_non_finite_logits_contribute_nothing_and_stay_finite(name):
    """Student -inf where the teacher is finite, teacher NaN, student +inf: each entry is left out of its
    own softmax and its term is 0 (spec §2 v2 masking); the reference applies the same rule entry by entry."""
    opts = OPTIONS.get(name, {})
    s, t = logits(seed=8)
    s[0, 2] = -math.inf
    t[1, 5] = math.nan
    s[2, 7] = math.inf
    t[3, 0] = -math.inf
    s.requires_grad_(True)
    t.requires_grad_(True)
    out = FUNCS[name](s, t, temperature=1.0, **opts)
    np.testing.assert_allclose(out.detach().numpy(), reference(name, s, t, 1.0, **opts), rtol=2e-5, atol=1e-6)
    out.sum().backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_fully_masked_row_gives_finite_zero_and_zero_gradient(name):
    s, t = logits(seed=9)
    s[1] = -math.inf
    t[2] = -math.inf
    s.requires_grad_(True)
    t.requires_grad_(True)
    out = FUNCS[name](s, t, **OPTIONS.get(name, {}))
    assert out[1] == 0 and out[2] == 0
    assert torch.isfinite(out).all() and (out[[0, 3]] > 0).all()
    out.sum().backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    assert (s.grad[[1, 2]] == 0).all() and (t.grad[[1, 2]] == 0).all()


# ---------------------------------------------------------------------------------------------------------
# Dtypes and shapes
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_input_is_computed_in_float32(name):
    opts = OPTIONS.get(name, {})
    s, t = logits(seed=10)
    s16, t16 = s.bfloat16(), t.bfloat16()
    out = FUNCS[name](s16, t16, temperature=2.0, **opts)
    assert out.dtype == torch.float32
    # Tight against float64 on the same (rounded) logits: a bf16 softmax would miss by ~1e-2.
    np.testing.assert_allclose(
        out.numpy(), reference(name, s16.float(), t16.float(), 2.0, **opts), rtol=2e-5, atol=1e-6
    )
    torch.testing.assert_close(out, FUNCS[name](s, t, temperature=2.0, **opts), rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("name", NAMES)
def test_output_is_one_value_per_row_even_for_zero_rows(name):
    s, t = logits(seed=11)
    assert FUNCS[name](s, t).shape == (4,)
    assert FUNCS[name](s[:0], t[:0]).shape == (0,)
    assert FUNCS[name](s.double(), t.double()).dtype == torch.float64  # kept for gradcheck-grade checks


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.1, 30.0), lam=st.floats(0.01, 1.0))
def test_divergences_are_non_negative_and_within_their_bounds(seed, scale, lam):
    s, t = logits(n=3, v=17, seed=seed, scale=scale)
    s[0, :4] = -math.inf  # masked vocabulary entries must not break the bounds either
    t[0, :4] = -math.inf
    for name in NAMES:
        opts = {"lam": lam} if "skew" in name else {}
        out = FUNCS[name](s, t, temperature=1.5, **opts)
        assert torch.isfinite(out).all() and (out >= -1e-6).all(), name
        if name in ("js", "generalized_jsd"):
            assert (out <= math.log(2) + 1e-6).all()
        if name == "tvd":
            assert (out <= 1 + 1e-6).all()
        if "skew" in name:
            assert (out <= -math.log(lam) + 1e-5).all()  # q >= lam * p bounds the log-ratio by -log lam


# ---------------------------------------------------------------------------------------------------------
# Adaptive KL head/tail split (spec §2.1), on hand-built examples
# ---------------------------------------------------------------------------------------------------------


def _hand_akl(pt, ps, tail):
    """AKL from explicit probabilities and an explicit tail set, written out by hand."""
    pt, ps = np.asarray(pt, float), np.asarray(ps, float)
    gap = np.abs(pt - ps)
    g_tail = sum(gap[v] for v in tail)
    g_head = gap.sum() - g_tail
    fkl = float((pt * np.log(pt / ps)).sum())
    rkl = float((ps * np.log(ps / pt)).sum())
    return (g_head * fkl + g_tail * rkl) / (g_head + g_tail)


def test_adaptive_kl_puts_the_token_reaching_mu_exactly_in_the_tail():
    # Uniform teacher: p_t = 1/4 exactly, cumulative mass 0.25, 0.5, 0.75, 1 (exact in float32). With
    # mu = 0.5 the second token reaches mu exactly, so `<=` puts tokens 0 and 1 (stable order) in the tail.
    ps = [0.02, 0.6, 0.08, 0.3]
    out = adaptive_kl.adaptive_kl(torch.tensor([ps]).log(), torch.zeros(1, 4), mu=0.5)
    inclusive = _hand_akl([0.25] * 4, ps, tail={0, 1})  # gaps 0.23 + 0.35 tail, 0.17 + 0.05 head
    strict = _hand_akl([0.25] * 4, ps, tail={0})  # what `< mu` would give
    crossing_in_tail = _hand_akl([0.25] * 4, ps, tail={0, 1, 2})
    assert abs(inclusive - strict) > 5e-2 and abs(inclusive - crossing_in_tail) > 3e-2
    assert out.item() == pytest.approx(inclusive, rel=1e-5)


@pytest.mark.parametrize(
    "mu,tail", [(0.05, set()), (0.25, {1}), (0.35, {1, 3}), (0.65, {1, 3, 0}), (1.0, {0, 1, 2, 3})]
)
def test_adaptive_kl_sorts_teacher_ascending_and_puts_the_crossing_token_in_the_head(mu, tail):
    # Teacher probabilities out of vocabulary order: ascending order is ids 1, 3, 0, 2 with cumulative mass
    # 0.1, 0.3, 0.6, 1.0. The token whose cumulative mass first exceeds mu belongs to the head.
    pt = [0.3, 0.1, 0.4, 0.2]
    ps = [0.15, 0.35, 0.2, 0.3]
    out = adaptive_kl.adaptive_kl(torch.tensor([ps]).log(), torch.tensor([pt]).log(), mu=mu)
    assert out.item() == pytest.approx(_hand_akl(pt, ps, tail), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Relations between divergences
# ---------------------------------------------------------------------------------------------------------


def test_generalized_jsd_at_half_equals_js():
    s, t = logits(seed=12)
    torch.testing.assert_close(
        generalized_jsd.generalized_jsd(s, t, temperature=2.0, beta=0.5), js.js(s, t, temperature=2.0)
    )


def test_generalized_jsd_end_points_are_forward_and_reverse_kl():
    s, t = logits(seed=13)
    torch.testing.assert_close(generalized_jsd.generalized_jsd(s, t, beta=0.0), forward_kl.forward_kl(s, t))
    torch.testing.assert_close(generalized_jsd.generalized_jsd(s, t, beta=1.0), reverse_kl.reverse_kl(s, t))


def test_skew_kls_reduce_to_plain_kl_at_lam_zero_and_vanish_at_lam_one():
    s, t = logits(seed=14)
    torch.testing.assert_close(skew_forward_kl.skew_forward_kl(s, t, lam=0.0), forward_kl.forward_kl(s, t))
    torch.testing.assert_close(skew_reverse_kl.skew_reverse_kl(s, t, lam=0.0), reverse_kl.reverse_kl(s, t))
    assert torch.equal(skew_forward_kl.skew_forward_kl(s, t, lam=1.0), torch.zeros(4))
    assert torch.equal(skew_reverse_kl.skew_reverse_kl(s, t, lam=1.0), torch.zeros(4))


def test_skew_kls_stay_finite_where_both_probabilities_underflow():
    # Both p_s and p_t underflow to 0 at the last entry: the reference's plain log(q) gives 0 * (-inf) = NaN.
    s = torch.tensor([[0.0, 1.0, -200.0]], requires_grad=True)
    t = torch.tensor([[0.5, 0.0, -200.0]], requires_grad=True)
    for fn in (
        skew_forward_kl.skew_forward_kl,
        skew_reverse_kl.skew_reverse_kl,
        js.js,
        generalized_jsd.generalized_jsd,
    ):
        opts = OPTIONS.get(fn.__name__, {})
        out = fn(s, t, **opts)
        assert torch.isfinite(out).all()
        np.testing.assert_allclose(out.detach().numpy(), reference(fn.__name__, s, t, 1.0, **opts), rtol=2e-5)
        out.sum().backward()
        assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,option",
    [
        ("skew_forward_kl", "lam"),
        ("skew_reverse_kl", "lam"),
        ("adaptive_kl", "mu"),
        ("generalized_jsd", "beta"),
    ],
)
@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan, "0.5"])
def test_out_of_range_option_raises_error_naming_the_option(name, option, bad):
    s, t = logits(seed=15)
    with pytest.raises(ValueError, match=rf"{name}.*option {option} must be a number in \[0, 1\]") as info:
        FUNCS[name](s, t, **{option: bad})
    assert isinstance(info.value, DskdError) and "\n" not in str(info.value)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf])
def test_non_positive_temperature_raises_error_naming_temperature(name, bad):
    s, t = logits(seed=16)
    with pytest.raises(DivergenceError, match="temperature must be a positive finite number"):
        FUNCS[name](s, t, temperature=bad)


@pytest.mark.parametrize("name", NAMES)
def test_mismatched_logit_shapes_raise_error_naming_both_shapes(name):
    s, t = logits(seed=17)
    with pytest.raises(DivergenceError, match=r"\(4, 9\) and \(4, 8\)"):
        FUNCS[name](s, t[:, :8])
    with pytest.raises(DivergenceError, match=r"shape \(N, V\)"):
        FUNCS[name](s.reshape(2, 2, 9), t.reshape(2, 2, 9))


# ---------------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_each_module_registers_exactly_its_own_name(module):
    calls = []
    module.dskd_register_divergences(lambda name, fn: calls.append((name, fn)))
    name = module.__name__.rsplit(".", 1)[1]
    assert calls == [(name, getattr(module, name))]
    assert hasattr(module.dskd_register_divergences, "dskd_impl")  # marked with @dskd.hookimpl


def test_builtin_divergences_load_through_the_registry_with_their_options():
    registry = load_registry(MODULES, entry_points=False)
    assert sorted(registry.divergences) == NAMES
    for name in NAMES:
        assert option_defaults(registry.divergences[name], skip=("temperature",)) == DEFAULTS.get(name, {})
        assert option_defaults(registry.divergences[name])["temperature"] == 1.0
    sparse = {name for name, fn in registry.divergences.items() if getattr(fn, "accepts_sparse_teacher", False)}
    assert sparse == {"forward_kl", "reverse_kl"}
