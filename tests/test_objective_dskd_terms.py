"""Every loss term of `dskd_v2` and `dskd` (v1), and their total and gradients, against a plain dense oracle.

The oracle is written here from the spec's formulas (§0, §4.3, §5.1-5.2) and shares no code with
`dskd.kit.dual_space`: it runs the models' own forwards (their logits, not `LMHead`), builds full-vocabulary
logits for every position, and takes softmax, cross-entropy and KL explicitly in float64. The s2t map of
DSKDv2 is `A = S' pinv(T')` with `torch.linalg.pinv`. Where the project deliberately departs from the
reference (module docstrings of `dskd` and `dskd_v2`), the oracle follows the project: one global denominator D
for every term, and the configured divergence in teacher space for v1 too:

    L = [(1 - a) CE + a (kd_student_space + projector_ce + kd_teacher_space)] / D
"""

from __future__ import annotations

import pytest
import torch
from dual_space_models import (
    assert_rel,
    make_batch,
    make_context,
    run_objective,
    student_and_teacher,
    tiny_tokenizer,
    tokenizer,
)
from objective_checks import divergence_oracle, log_softmax64

from dskd.plugins.divergences.forward_kl import forward_kl
from dskd.plugins.divergences.reverse_kl import reverse_kl
from dskd.plugins.objectives.dskd import dskd_objective
from dskd.plugins.objectives.dskd_v2 import dskd_v2

DENOMINATOR = 11.0  # not the local token count, so a term normalised locally would show


# -- the oracle: spec formulas, full logits, float64 -------------------------------------------------------------


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -log_softmax64(logits).gather(-1, targets[:, None]).sum()


def model_outputs(model, batch, *, student: bool):
    ids = batch.student_input_ids if student else batch.teacher_input_ids
    mask = batch.student_attention_mask if student else batch.teacher_attention_mask
    labels = batch.student_labels if student else batch.teacher_labels
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    valid = labels != -100
    return out.hidden_states[-1][valid], out.logits[valid], labels[valid]


def oracle(
    version: str,
    student,
    teacher,
    projectors,
    batch,
    *,
    divergence: str,
    temperature: float,
    kd_rate: float,
    terms: str = "both",
) -> dict[str, torch.Tensor]:
    """Per-term sums, the agreement count and the total loss, from the spec's formulas."""
    h_s, z_s, gold = model_outputs(student, batch, student=True)
    with torch.no_grad():
        h_t, z_t, _ = model_outputs(teacher, batch, student=False)
    w_s = student.lm_head.weight.detach()  # sg(W_s): the projected teacher's logits never train the head
    w_t = teacher.lm_head.weight
    out = {"ce": cross_entropy_sum(z_s, gold)}
    if version == "v2":
        h_t2s = h_t @ projectors.t2s.weight.T
        z_t2s = h_t2s @ w_s.T
        labels = z_t.argmax(-1)  # the teacher's top-1 (v2), not the gold token
        agree = z_t2s.argmax(-1) == labels
        s2t = w_s.double().T @ torch.linalg.pinv(w_t.double().T)  # A = S' pinv(T'), (d_s, d_t)
        z_s2t = (h_s.double() @ s2t) @ w_t.double().T
    else:
        z_t2s = (h_t @ projectors.t2s.weight.T + projectors.t2s.bias) @ w_s.T
        labels = gold
        agree = torch.ones_like(gold, dtype=torch.bool)  # v1 has no gate
        z_s2t = (h_s @ projectors.s2t.weight.T + projectors.s2t.bias) @ w_t.T
    out["projector_ce"] = cross_entropy_sum(z_t2s, labels)
    out["kd_student_space"] = (divergence_oracle(divergence, z_s, z_t2s.detach(), temperature) * agree).sum()
    out["kd_teacher_space"] = divergence_oracle(divergence, z_s2t, z_t, temperature).sum()
    out["n_agree"] = agree.sum()
    kd = {
        "both": out["kd_student_space"] + out["projector_ce"] + out["kd_teacher_space"],
        "student": out["kd_student_space"] + out["projector_ce"],
        "teacher": out["kd_teacher_space"],
    }[terms]
    out["loss"] = ((1 - kd_rate) * out["ce"] + kd_rate * kd) / DENOMINATOR
    return out


# -- fixtures and plumbing ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    return student_and_teacher(tiny_tokenizer())


@pytest.fixture(scope="module")
def batch():
    # Two sequences of different lengths: prompt and padding rows carry -100 and must drop out.
    return make_batch([10, 8], [2, 3], seed=3)


def grads(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for name, p in params.items()}


def objective_and_oracle(version, models, batch, *, divergence, temperature, kd_rate, terms="both", chunk_size=4):
    """(terms, oracle, their gradients) for one objective, each computed from zeroed gradients."""
    student, teacher = models
    fn = {"forward_kl": forward_kl, "reverse_kl": reverse_kl}[divergence]
    context = make_context(student, teacher, divergence=fn, temperature=temperature, chunk_size=chunk_size)
    objective = dskd_v2(context, terms=terms) if version == "v2" else dskd_objective(context)
    params = {f"student.{n}": p for n, p in student.named_parameters()}
    params.update({f"projector.{n}": p for n, p in objective.trainable_modules().named_parameters()})
    for p in params.values():
        p.grad = None
    result = run_objective(objective, student, teacher, batch, DENOMINATOR, kd_rate=kd_rate)
    result.loss.backward()
    got = grads(params)
    for p in params.values():
        p.grad = None
    ref = oracle(
        version,
        student,
        teacher.model,
        objective.trainable_modules(),
        batch,
        divergence=divergence,
        temperature=temperature,
        kd_rate=kd_rate,
        terms=terms,
    )
    ref["loss"].backward()
    expected = grads(params)
    for p in params.values():
        p.grad = None
    return result, ref, got, expected


# -- tests -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence,temperature", [("forward_kl", 1.0), ("reverse_kl", 2.0)])
def test_dskd_v2_terms_and_gradients_match_the_dense_oracle(models, batch, divergence, temperature):
    result, ref, got, expected = objective_and_oracle(
        "v2", models, batch, divergence=divergence, temperature=temperature, kd_rate=0.3
    )
    n_valid = int((batch.student_labels != -100).sum())
    # The fixture is built so that the agreement gate keeps some tokens and drops others.
    assert 0 < int(ref["n_agree"]) < n_valid
    assert int(result.counts["kd_student_space"]) == int(ref["n_agree"])
    for term in ("ce", "kd_student_space", "projector_ce", "kd_teacher_space"):
        assert_rel(result.sums[term], ref[term], what=term)
    assert_rel(result.loss, ref["loss"], what="loss")
    for name in expected:
        assert_rel(got[name], expected[name], what=f"grad {name}")
    assert expected["projector.t2s.weight"].abs().max() > 0


@pytest.mark.parametrize("terms", ["student", "teacher"])
def test_dskd_v2_single_space_terms_match_the_dense_oracle(models, batch, terms):
    result, ref, got, expected = objective_and_oracle(
        "v2", models, batch, divergence="forward_kl", temperature=1.0, kd_rate=0.6, terms=terms
    )
    assert_rel(result.loss, ref["loss"], what="loss")
    for name in expected:
        assert_rel(got[name], expected[name], what=f"grad {name}")


def test_dskd_v2_chunk_size_does_not_change_loss_or_gradients(models, batch):
    common = dict(divergence="forward_kl", temperature=1.0, kd_rate=0.5)
    one = objective_and_oracle("v2", models, batch, chunk_size=1, **common)
    all_rows = objective_and_oracle("v2", models, batch, chunk_size=64, **common)
    assert_rel(one[0].loss, all_rows[0].loss, what="loss")
    for name in one[2]:
        assert_rel(one[2][name], all_rows[2][name], what=f"grad {name}")


@pytest.mark.parametrize("divergence,temperature", [("forward_kl", 2.0), ("reverse_kl", 1.0)])
def test_dskd_v1_terms_and_gradients_match_the_dense_oracle(models, batch, divergence, temperature):
    result, ref, got, expected = objective_and_oracle(
        "v1", models, batch, divergence=divergence, temperature=temperature, kd_rate=0.5
    )
    n_valid = int((batch.student_labels != -100).sum())
    assert int(result.counts["kd_student_space"]) == n_valid  # v1: no agreement gate
    for term in ("ce", "kd_student_space", "projector_ce", "kd_teacher_space"):
        assert_rel(result.sums[term], ref[term], what=term)
    assert_rel(result.loss, ref["loss"], what="loss")
    for name in expected:
        assert_rel(got[name], expected[name], what=f"grad {name}")
    # Both v1 projectors are trained (the v2 repository's copy never trained s2t, spec §14.6).
    for name in ("projector.t2s.weight", "projector.t2s.bias", "projector.s2t.weight", "projector.s2t.bias"):
        assert got[name].abs().max() > 0, name


def test_dskd_v2_matches_the_oracle_over_the_real_tinyllama_vocabulary():
    # The real 32,000-token vocabulary: float32 sums over it carry ~1e-5 of rounding (see dual_space_models),
    # hence 5e-5 here; the 1e-5 comparisons above use the 61-token vocabulary.
    tok = tokenizer("tinyllama")
    models = student_and_teacher(tok)
    batch = make_batch([9, 7], [2, 1], vocab_size=len(tok), seed=5)
    result, ref, got, expected = objective_and_oracle(
        "v2", models, batch, divergence="forward_kl", temperature=2.0, kd_rate=0.5, chunk_size=4
    )
    for term in ("ce", "kd_student_space", "projector_ce", "kd_teacher_space"):
        assert_rel(result.sums[term], ref[term], tol=5e-5, what=term)
    assert_rel(result.loss, ref["loss"], tol=5e-5, what="loss")
    for name in expected:
        assert_rel(got[name], expected[name], tol=5e-5, what=f"grad {name}")
