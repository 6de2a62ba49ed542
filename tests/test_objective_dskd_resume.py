"""Resuming restores the dual-space projectors exactly, and the closed-form s2t map follows the restored head.

Mirrors the engine: after a training step, the student and `objective.trainable_modules()` are saved with
`dskd.run.checkpoint.save`; a fresh run builds a new student and objective (with other weights), loads both
from the checkpoint, and calls `on_optimizer_step()` to rebuild the maps that follow the student head.
"""

from __future__ import annotations

import pytest
import torch
from dual_space_models import make_batch, make_context, run_objective, student_and_teacher, tiny_student, tiny_tokenizer

from dskd.models.teacher import LocalTeacher
from dskd.plugins.divergences.forward_kl import forward_kl
from dskd.plugins.objectives.dskd import dskd_objective
from dskd.plugins.objectives.dskd_v2 import dskd_v2
from dskd.run import checkpoint

FACTORIES = {"v1": dskd_objective, "v2": dskd_v2}


def build(version: str, student, teacher: LocalTeacher):
    return FACTORIES[version](make_context(student, teacher, divergence=forward_kl, chunk_size=3))


def train_step(objective, student, teacher, batch) -> None:
    params = list(student.parameters()) + list(objective.trainable_modules().parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    run_objective(objective, student, teacher, batch, float(batch.num_student_tokens()), kd_rate=0.5).loss.backward()
    optimizer.step()
    objective.on_optimizer_step()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_resume_restores_the_projectors_and_the_s2t_map_exactly(tmp_path, version):
    tok = tiny_tokenizer()
    student, teacher = student_and_teacher(tok)
    batch = make_batch([9, 6], [1, 2], seed=7)
    objective = build(version, student, teacher)
    train_step(objective, student, teacher, batch)
    state = {"model": student.state_dict(), "objective": objective.trainable_modules().state_dict()}
    checkpoint.save(tmp_path, 1, state, {}, keep=1)
    reference_loss = run_objective(objective, student, teacher, batch, 10.0, kd_rate=0.5).loss.detach()

    fresh_student = tiny_student(len(tok), seed=123)  # other weights: nothing may survive by accident
    fresh = build(version, fresh_student, teacher)
    saved = objective.trainable_modules().state_dict()
    assert not all(torch.equal(v, fresh.trainable_modules().state_dict()[k]) for k, v in saved.items())
    loaded = checkpoint.latest(tmp_path)
    fresh_student.load_state_dict(loaded.load("model"))
    fresh.trainable_modules().load_state_dict(loaded.load("objective"))
    fresh.on_optimizer_step()

    restored = fresh.trainable_modules().state_dict()
    assert restored.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(restored[key], value), key
    if version == "v2":
        assert torch.equal(fresh.s2t_weight, objective.s2t_weight)
    assert torch.equal(
        run_objective(fresh, fresh_student, teacher, batch, 10.0, kd_rate=0.5).loss.detach(), reference_loss
    )
