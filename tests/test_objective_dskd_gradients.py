"""Where the dual-space objectives send gradients, and gradient accumulation over micro-batches.

- The teacher never receives a gradient, even when its parameters would accept one.
- The teacher-space path reaches the student only through its hidden states (body), never its LM head;
  the student-space KD trains the head.
- The t2s projector learns from the projector CE alone (the KD against it is detached); in v1 the s2t
  projector learns from the teacher-space KD alone.
- Two micro-batches with the step's global denominator accumulate to the gradient of one batch holding both.
"""

from __future__ import annotations

import pytest
import torch
from dual_space_models import (
    assert_rel,
    make_batch,
    make_context,
    run_objective,
    split_batch,
    student_and_teacher,
    tiny_tokenizer,
)
from test_objective_dskd_terms import DENOMINATOR, oracle

from dskd.plugins.divergences.forward_kl import forward_kl
from dskd.plugins.objectives.dskd import dskd_objective
from dskd.plugins.objectives.dskd_v2 import dskd_v2


@pytest.fixture(scope="module")
def models():
    return student_and_teacher(tiny_tokenizer())


@pytest.fixture(scope="module")
def batch():
    return make_batch([10, 8], [2, 3], seed=3)


def build(version, models, **options):
    student, teacher = models
    context = make_context(student, teacher, divergence=forward_kl, chunk_size=4)
    return dskd_v2(context, **options) if version == "v2" else dskd_objective(context)


def zero_grads(*modules):
    for module in modules:
        for p in module.parameters():
            p.grad = None


def backward(objective, models, batch, denominator=DENOMINATOR, *, kd_rate=0.5):
    student, teacher = models
    zero_grads(student, objective.trainable_modules())
    terms = run_objective(objective, student, teacher, batch, denominator, kd_rate=kd_rate)
    terms.loss.backward()
    return terms


def is_zero(grad) -> bool:
    return grad is None or bool(grad.abs().max() == 0)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_teacher_never_receives_a_gradient(models, batch, version):
    student, teacher = models
    objective = build(version, models)
    teacher.model.requires_grad_(True)  # even a teacher whose parameters would accept gradients gets none
    try:
        backward(objective, models, batch)
        assert all(p.grad is None for p in teacher.model.parameters())
    finally:
        teacher.model.requires_grad_(False)
    assert student.lm_head.weight.grad is not None


def test_teacher_space_kd_trains_the_student_body_but_not_its_head(models, batch):
    student, _ = models
    terms = backward(build("v2", models, terms="teacher"), models, batch, kd_rate=1.0)
    assert float(terms.sums["kd_teacher_space"]) > 0
    assert is_zero(student.lm_head.weight.grad)
    assert not is_zero(student.model.norm.weight.grad)
    assert not is_zero(student.model.layers[0].mlp.down_proj.weight.grad)


def test_dskd_v1_head_gradient_comes_from_student_space_kd_alone(models, batch):
    # v1 has no terms option: with kd_rate 1 (no gold CE) the head's gradient must equal that of the
    # student-space KD by itself, so the projector CE (detached head) and the teacher-space KD add nothing.
    student, teacher = models
    objective = build("v1", models)
    backward(objective, models, batch, kd_rate=1.0)
    got = student.lm_head.weight.grad.clone()
    ref = oracle(
        "v1",
        student,
        teacher.model,
        objective.trainable_modules(),
        batch,
        divergence="forward_kl",
        temperature=1.0,
        kd_rate=1.0,
    )
    (expected,) = torch.autograd.grad(ref["kd_student_space"] / DENOMINATOR, [student.lm_head.weight])
    assert_rel(got, expected, what="lm_head")


def test_student_space_kd_trains_the_student_head(models, batch):
    student, _ = models
    backward(build("v2", models, terms="student"), models, batch, kd_rate=1.0)
    assert not is_zero(student.lm_head.weight.grad)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_t2s_projector_learns_from_the_projector_ce_alone(models, batch, version):
    student, teacher = models
    kd_rate = 0.7
    objective = build(version, models)
    backward(objective, models, batch, kd_rate=kd_rate)
    projectors = objective.trainable_modules()
    got = {n: p.grad.clone() for n, p in projectors.named_parameters()}
    ref = oracle(
        version, student, teacher.model, projectors, batch, divergence="forward_kl", temperature=1.0, kd_rate=kd_rate
    )
    t2s = dict(projectors.t2s.named_parameters())
    only_ce = torch.autograd.grad(kd_rate * ref["projector_ce"] / DENOMINATOR, list(t2s.values()), retain_graph=True)
    for (name, _), expected in zip(t2s.items(), only_ce):
        assert_rel(got[f"t2s.{name}"], expected, what=f"t2s.{name}")
    if version == "v1":  # and s2t from the teacher-space KD alone
        s2t = dict(projectors.s2t.named_parameters())
        only_kd = torch.autograd.grad(kd_rate * ref["kd_teacher_space"] / DENOMINATOR, list(s2t.values()))
        for (name, _), expected in zip(s2t.items(), only_kd):
            assert_rel(got[f"s2t.{name}"], expected, what=f"s2t.{name}")
    # Without KD the projectors are not on any gradient path.
    backward(objective, models, batch, kd_rate=0.0)
    assert all(is_zero(p.grad) for p in projectors.parameters())


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_two_micro_batches_accumulate_to_the_gradient_of_one_batch(models, batch, version):
    student, _ = models
    objective = build(version, models)
    params = {f"student.{n}": p for n, p in student.named_parameters()}
    params.update({f"projector.{n}": p for n, p in objective.trainable_modules().named_parameters()})
    # The step's denominator is the valid-token count of the whole step (both micro-batches), spec §0.
    total = float(batch.num_student_tokens())
    whole = backward(objective, models, batch, total)
    expected = {n: p.grad.clone() for n, p in params.items()}
    zero_grads(student, objective.trainable_modules())
    parts = [split_batch(batch, 0), split_batch(batch, 1)]
    assert sum(p.num_student_tokens() for p in parts) == total
    sums = {}
    for part in parts:  # no zeroing between them: .grad accumulates, as in the engine
        terms = run_objective(objective, student, models[1], part, total, kd_rate=0.5)
        terms.loss.backward()
        for key, value in terms.sums.items():
            sums[key] = sums.get(key, 0.0) + value
    for name, p in params.items():
        assert_rel(p.grad, expected[name], what=name)
    for key in ("ce", "kd_student_space", "projector_ce", "kd_teacher_space"):
        assert_rel(sums[key], whole.sums[key], what=key)
