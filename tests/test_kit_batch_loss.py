"""`dskd.kit.loss_terms_on_batch`: a job's objective on one fixed batch, outside the engine, against the
formula computed from the two models' dense logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from objective_checks import log_softmax64
from tiny_job import write_job

from dskd.config import load_config
from dskd.kit import loss_terms_on_batch
from dskd.run.components import build_student, build_teacher
from dskd.types import IGNORE_INDEX

SAMPLES = [
    ("### Instruction:\nName a colour.\n### Response:\n", "Blue."),
    ("### Instruction:\nAdd 2 and 3.\n### Response:\n", "The sum is 5."),
]


def dense_logits(model, batch, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask, labels = (getattr(batch, f"{prefix}_{name}") for name in ("input_ids", "attention_mask", "labels"))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    keep = labels != IGNORE_INDEX
    return logits[keep].double(), labels[keep]


def test_kd_on_a_fixed_batch_is_the_weighted_ce_and_kl_of_the_dense_logits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(write_job(tmp_path, objective="kd"))
    student = build_student(config, torch.device("cpu"))
    result = loss_terms_on_batch(config, SAMPLES, student=student)

    teacher = build_teacher(config, torch.device("cpu"))  # the same random init, seeded by the job
    s_logits, labels = dense_logits(student.model, result.batch, "student")
    t_logits, _ = dense_logits(teacher.model, result.batch, "teacher")
    tau, rate = config.objective.temperature, config.objective.kd_rate
    ce = F.cross_entropy(s_logits, labels, reduction="sum")
    log_t, log_s = log_softmax64(t_logits, tau), log_softmax64(s_logits, tau)
    kl = (log_t.exp() * (log_t - log_s)).sum()
    n = labels.shape[0]
    assert set(result.terms.parts) == {"ce", "kd"}
    torch.testing.assert_close(result.terms.sums["ce"].double(), ce, rtol=1e-5, atol=0)
    # A small KL summed in float32 over the 32,000-token vocabulary: rounding of ~1e-6 in absolute terms.
    torch.testing.assert_close(result.terms.sums["kd"].double(), kl, rtol=1e-4, atol=1e-5)
    expected = ((1 - rate) * ce + rate * kl) / n
    torch.testing.assert_close(result.loss.detach().double(), expected, rtol=1e-5, atol=0)
    result.loss.backward()  # differentiable, as the engine uses it
    assert student.model.lm_head.weight.grad is not None or student.model.model.embed_tokens.weight.grad is not None


def test_sft_on_the_first_training_samples_needs_no_teacher_and_weighs_the_ce_fully(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(write_job(tmp_path, objective="sft"))
    student = build_student(config, torch.device("cpu"))
    result = loss_terms_on_batch(config, student=student)
    assert result.batch.size == config.train.batch_size
    s_logits, labels = dense_logits(student.model, result.batch, "student")
    mean_ce = F.cross_entropy(s_logits, labels)
    torch.testing.assert_close(result.loss.detach().double(), mean_ce, rtol=1e-5, atol=0)
