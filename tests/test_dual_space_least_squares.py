"""The least-squares maps between the two head spaces (spec §5.1, §16.3), against `torch.linalg.pinv` in float64.

`least_squares_map(S', T')` is the t2s initialisation `Y = argmin ||Y S' - T'||_F`; `right_inverse_factor(T')`
is `pinv(T')`, from which the s2t map `A = S' pinv(T')` is rebuilt after every optimizer step. Heads are
`S' = W_s^T (d_s x V')` and `T' = W_t^T (d_t x V')`.
"""

from __future__ import annotations

import pytest
import torch
from dual_space_models import assert_rel, make_context, student_and_teacher, tokenizer

from dskd.kit.dual_space import least_squares_map, right_inverse_factor
from dskd.plugins.divergences.forward_kl import forward_kl
from dskd.plugins.objectives.dskd_v2 import dskd_v2

D_S, D_T, V = 16, 24, 200


def frob(x: torch.Tensor) -> float:
    return float(torch.linalg.norm(x.double()))


def heads(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(D_S, V, generator=gen), torch.randn(D_T, V, generator=gen)


def rank_deficient(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Rows made exactly dependent: the float64 Gram matrix is singular in exact arithmetic, whatever rounding
    does to its factorisation. "dead": a hidden unit that is zero for every token (an exact zero pivot);
    "duplicated": a copied unit and an exact multiple of another (rounding-level pivots)."""
    x = x.clone()
    if kind == "dead":
        x[1] = 0.0
    else:
        x[5] = x[2]
        x[11] = -0.5 * x[3]
    return x


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_t2s_residual_equals_the_least_squares_optimum(seed):
    s, t = heads(seed)
    y = least_squares_map(s, t)
    assert y.shape == (D_T, D_S) and y.dtype == torch.float32
    sd, td = s.double(), t.double()
    optimum = frob(td @ (torch.eye(V, dtype=torch.float64) - torch.linalg.pinv(sd) @ sd))
    assert frob(y.double() @ sd - td) == pytest.approx(optimum, rel=1e-6)
    assert_rel(y, td @ torch.linalg.pinv(sd), what="Y vs T' pinv(S')")


def test_t2s_map_recovers_an_exact_linear_relation():
    s, _ = heads(3)
    r = torch.randn(D_T, D_S, generator=torch.Generator().manual_seed(4))
    t = (r.double() @ s.double()).float()
    y = least_squares_map(s, t)
    assert_rel(y, r, what="Y vs R")
    assert frob(y.double() @ s.double() - t.double()) <= 1e-5 * frob(t)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_s2t_residual_equals_the_least_squares_optimum(seed):
    s, t = heads(seed)
    a = s.double() @ right_inverse_factor(t).double()  # (d_s, d_t)
    sd, td = s.double(), t.double()
    optimum = frob(sd @ (torch.eye(V, dtype=torch.float64) - torch.linalg.pinv(td) @ td))
    assert frob(a @ td - sd) == pytest.approx(optimum, rel=1e-6)
    assert_rel(right_inverse_factor(t), torch.linalg.pinv(td), what="Q vs pinv(T')")


def test_s2t_map_recovers_an_exact_linear_relation():
    _, t = heads(5)
    r = torch.randn(D_S, D_T, generator=torch.Generator().manual_seed(6))
    s = (r.double() @ t.double()).float()
    a = s.double() @ right_inverse_factor(t).double()
    assert_rel(a, r, what="A vs R")


@pytest.mark.parametrize("kind", ["dead", "duplicated"])
def test_rank_deficient_heads_give_the_minimum_norm_solution(kind):
    # Forty seeds: rounding lets the Cholesky factorisation of a singular Gram matrix succeed for some of them
    # (a pivot of ~1e-16), which must still lead to the pinv answer, not to arbitrary null-space components.
    for seed in range(40):
        s, t = heads(seed)
        s_def, t_def = rank_deficient(s, kind), rank_deficient(t, kind)
        y = least_squares_map(s_def, t)
        expected = t.double() @ torch.linalg.pinv(s_def.double())
        assert_rel(y, expected, what=f"seed {seed}: Y")
        sd, td = s_def.double(), t.double()
        optimum = frob(td - td @ torch.linalg.pinv(sd) @ sd)
        assert frob(y.double() @ sd - td) == pytest.approx(optimum, rel=1e-6)
        q = right_inverse_factor(t_def)
        assert_rel(q, torch.linalg.pinv(t_def.double()), what=f"seed {seed}: Q")


# -- the objective: initialisation and the per-step s2t map, over the real TinyLlama vocabulary -------------------


@pytest.fixture(scope="module")
def models():
    return student_and_teacher(tokenizer("tinyllama"))


def build(models, **options):
    student, teacher = models
    return dskd_v2(make_context(student, teacher, divergence=forward_kl), **options)


def test_dskd_v2_initialises_t2s_to_the_least_squares_map(models):
    student, teacher = models
    objective = build(models)
    s = student.lm_head.weight.detach().double().T  # same vocabulary: V' is every id
    t = teacher.model.lm_head.weight.double().T
    assert_rel(objective.projectors.t2s.weight.T, t @ torch.linalg.pinv(s), what="t2s init")
    torch.manual_seed(0)
    random = build(models, init_projector=False)
    assert not torch.allclose(random.projectors.t2s.weight, objective.projectors.t2s.weight)


def test_dskd_v2_rebuilds_the_s2t_map_from_the_current_student_head(models):
    student, teacher = models
    objective = build(models)
    t = teacher.model.lm_head.weight.double().T
    before = objective.s2t_weight.clone()
    expected = student.lm_head.weight.detach().double().T @ torch.linalg.pinv(t)
    assert_rel(objective.s2t_weight.T, expected, what="A at init")
    original = student.lm_head.weight.detach().clone()
    try:
        with torch.no_grad():  # what an optimizer step does to the head
            student.lm_head.weight.add_(torch.randn_like(original), alpha=0.5)
        # Between optimizer steps the map stays put (all micro-batches of a step see the same A) ...
        assert torch.equal(objective.s2t_weight, before)
        objective.on_optimizer_step()
        # ... and after one it is S' pinv(T') of the head as it is now.
        expected = student.lm_head.weight.detach().double().T @ torch.linalg.pinv(t)
        assert_rel(objective.s2t_weight.T, expected, what="A after the step")
        assert not torch.allclose(objective.s2t_weight, before)
    finally:
        with torch.no_grad():
            student.lm_head.weight.copy_(original)


def test_shared_vocab_limit_restricts_both_maps_to_the_first_ids(models):
    student, teacher = models
    k = 500
    objective = build(models, shared_vocab_limit=k)
    s = student.lm_head.weight.detach().double()[:k].T
    t = teacher.model.lm_head.weight.double()[:k].T
    assert_rel(objective.projectors.t2s.weight.T, t @ torch.linalg.pinv(s), what="t2s on V'[:k]")
    assert_rel(objective.s2t_weight.T, s @ torch.linalg.pinv(t), what="A on V'[:k]")
