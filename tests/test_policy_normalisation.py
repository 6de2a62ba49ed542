"""Split steps (spec §7.1): the CE is the mean over the dataset's response tokens and the KD the mean over the
sampled tokens, each over its own population.

At engine level, step 1 of a real on-policy job is recomputed by hand from the two micro-batches the policy
made and the models as they were before the step (dense float64 logits, forward KL written out), and compared
with the logged loss and terms. At objective level, every objective an on-policy step can use honours the CE-only
and KD-only roles of the two batches (a batch's role scales its part and silences the other).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from cross_vocab_models import make_batch, make_context, models, run_objective, tokenizer, valid_outputs
from policy_setup import make_job, metrics, write_policy_job
from tiny_job import llama_config
from transformers import LlamaConfig, LlamaForCausalLM

from dskd.kit.lm_head import last_hidden_state
from dskd.kit.objective import student_ce_terms
from dskd.kit.weights import LossWeights, weighting
from dskd.models.teacher import LocalTeacher
from dskd.plugins.aligners.eta import eta
from dskd.plugins.aligners.index import index
from dskd.plugins.aligners.mined import mined
from dskd.plugins.divergences.forward_kl import forward_kl
from dskd.plugins.objectives.dskd_cma import dskd_cma
from dskd.plugins.objectives.dskd_v2 import dskd_v2
from dskd.plugins.objectives.kd import kd
from dskd.plugins.objectives.mined_kd import mined_kd
from dskd.plugins.objectives.uld import uld
from dskd.run.engine import Trainer
from dskd.types import IGNORE_INDEX

KD_RATE = 0.7  # not 0.5, so that swapping the CE and KD weights would show
TEMPERATURE = 2.0  # tiny_job's


def save_sharp_teacher(folder) -> str:
    """A 1-layer Llama with a scaled head: a peaked teacher, so that the KD term is large next to the CE."""
    config = LlamaConfig(**{k: v for k, v in llama_config(24).items() if k not in ("architectures", "model_type")})
    config.tie_word_embeddings = False
    torch.manual_seed(5)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(folder)
    return str(folder)


def spy_first_step(monkeypatch) -> dict:
    """Record, at the first step, the student before it is updated, the teacher, and the prepared micro-batches."""
    seen: dict = {}
    original_step, original_prepare = Trainer.train_step, Trainer._prepare

    def prepare(self, window):
        out = original_prepare(self, window)
        seen.setdefault("window", [dataclasses.replace(b) for b in out])
        return out

    def step(self, window, meter):
        if "student" not in seen:
            seen["student"] = copy.deepcopy(self.accelerator.unwrap_model(self.model)).double().eval()
            seen["teacher"] = copy.deepcopy(self.spec.teacher.model).double().eval()
        return original_step(self, window, meter)

    monkeypatch.setattr(Trainer, "_prepare", prepare)
    monkeypatch.setattr(Trainer, "train_step", step)
    return seen


def label_logits(model, ids, mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 logits and labels at the valid label positions, from the model's own dense forward."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    keep = labels != IGNORE_INDEX
    return logits[keep].double(), labels[keep]


def forward_kl_by_hand(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """sum over tokens of KL(p_t || p_s) at temperature tau (both logits divided by tau), float64."""
    log_p_t, log_p_s = torch.log_softmax(teacher / tau, -1), torch.log_softmax(student / tau, -1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum()


@pytest.mark.parametrize("ce_on_gold", [True, False])
def test_an_on_policy_step_is_the_gold_ce_mean_plus_the_sampled_kd_mean(tmp_path, monkeypatch, ce_on_gold):
    teacher_dir = save_sharp_teacher(tmp_path / "teacher_model")
    path = write_policy_job(
        tmp_path,
        vocab="same",
        objective="kd",
        policy="on_policy",
        steps=1,
        samples=8,
        options={"max_new_tokens": 6, "ce_on_gold": ce_on_gold},
    )
    seen = spy_first_step(monkeypatch)
    make_job(path, [f"teacher.model={teacher_dir}", f"objective.kd_rate={KD_RATE}"]).distill(None)
    [line] = metrics(tmp_path / "run")

    window = seen["window"]
    assert [(b.ce, b.kd) for b in window] == ([(True, False), (False, True)] if ce_on_gold else [(False, True)])
    sampled, student, teacher = window[-1], seen["student"], seen["teacher"]
    s_logits, _ = label_logits(
        student, sampled.student_input_ids, sampled.student_attention_mask, sampled.student_labels
    )
    t_logits, _ = label_logits(
        teacher, sampled.teacher_input_ids, sampled.teacher_attention_mask, sampled.teacher_labels
    )
    kd_mean = forward_kl_by_hand(s_logits, t_logits, TEMPERATURE) / s_logits.shape[0]
    assert kd_mean > 0.5, "setup: the KD term should be large enough to see its normaliser"
    expected = KD_RATE * kd_mean
    assert line["train/kd"] == pytest.approx(float(kd_mean), rel=1e-4)
    if ce_on_gold:
        gold = window[0]
        g_logits, g_labels = label_logits(
            student, gold.student_input_ids, gold.student_attention_mask, gold.student_labels
        )
        assert g_logits.shape[0] != s_logits.shape[0], "setup: equal token counts could not tell the normalisers apart"
        ce_mean = F.cross_entropy(g_logits, g_labels, reduction="sum") / g_logits.shape[0]
        expected = expected + (1 - KD_RATE) * ce_mean
        assert line["train/ce"] == pytest.approx(float(ce_mean), rel=1e-4)  # over the gold tokens only
    else:
        assert "train/ce" not in line, "a KD-only step logged a CE over the samples"
    assert line["train/loss"] == pytest.approx(float(expected), rel=1e-4)
    assert line["policy/on_policy:sampled"] == 1


# -- every objective an on-policy step can use honours the roles of its two batches ------------------------------

KD_TERMS = {
    "kd": ("kd",),
    "uld": ("kd",),
    "mined_kd": ("kd",),
    "dskd_v2": ("kd_student_space", "projector_ce", "kd_teacher_space"),
    "dskd_cma": ("kd_student_space", "projector_ce", "kd_teacher_space"),
}
DENOMINATOR = 11.0


@pytest.fixture(scope="module")
def cross_vocab(tmp_path_factory):
    student, teacher = models("gpt2", "tinyllama")
    t_tok, s_tok = tokenizer("tinyllama"), tokenizer("gpt2")
    aligners = {
        "uld": index(t_tok, s_tok),
        "mined_kd": mined(t_tok, s_tok, cache_dir=str(tmp_path_factory.mktemp("mined"))),
        "dskd_v2": eta(t_tok, s_tok),
        "dskd_cma": None,
    }
    return student, teacher, aligners


def build(name: str, cross_vocab):
    if name == "kd":
        student, teacher = models("tinyllama", "tinyllama")
        context = make_context(student, teacher, "tinyllama", divergence=forward_kl, same_vocab=True)
        return student, teacher, kd(context), make_batch(None, "tinyllama", "tinyllama"), context
    student, teacher, aligners = cross_vocab
    aligner = aligners[name]
    context = make_context(student, teacher, divergence=forward_kl, aligner=aligner)
    factory = {"uld": uld, "mined_kd": mined_kd, "dskd_v2": dskd_v2, "dskd_cma": dskd_cma}[name]
    return student, teacher, factory(context), make_batch(aligner), context


def gold_ce_sum(student, batch) -> float:
    total = 0.0
    with torch.no_grad():
        for b in range(batch.size):
            _, logits, labels = valid_outputs(
                student, batch.student_input_ids, batch.student_attention_mask, batch.student_labels, b
            )
            total += float(F.cross_entropy(logits.double(), labels, reduction="sum"))
    return total


@pytest.mark.slow
@pytest.mark.parametrize("name", list(KD_TERMS))
def test_a_ce_only_batch_trains_only_the_ce_and_a_kd_only_batch_only_the_kd(name, cross_vocab):
    student, teacher, objective, batch, _ = build(name, cross_vocab)
    both = run_objective(objective, student, teacher, batch, DENOMINATOR, kd_rate=KD_RATE)
    kd_sum = sum(float(both.sums[k]) for k in KD_TERMS[name])
    ce_sum = gold_ce_sum(student, batch)
    assert float(both.sums["ce"]) == pytest.approx(ce_sum, rel=1e-4)
    # Unsplit: the mixture of spec §1.3, so the terms above are exactly the two parts.
    assert float(both.loss.detach()) * DENOMINATOR == pytest.approx((1 - KD_RATE) * ce_sum + KD_RATE * kd_sum, rel=1e-4)
    assert kd_sum > 0.01, "setup: a vanishing KD part could hide in the CE part"

    ce_only = dataclasses.replace(batch, ce=True, kd=False)
    weights = LossWeights.for_batch(kd_rate=KD_RATE, denominator=DENOMINATOR, ce_scale=1.75, kd_scale=0.0)
    loss = run_objective(objective, student, teacher, ce_only, DENOMINATOR, kd_rate=KD_RATE, weights=weights).loss
    assert float(loss.detach()) * DENOMINATOR == pytest.approx((1 - KD_RATE) * 1.75 * ce_sum, rel=1e-4)

    kd_only = dataclasses.replace(batch, ce=False, kd=True)
    weights = LossWeights.for_batch(kd_rate=KD_RATE, denominator=DENOMINATOR, ce_scale=0.0, kd_scale=1.25)
    loss = run_objective(objective, student, teacher, kd_only, DENOMINATOR, kd_rate=KD_RATE, weights=weights).loss
    assert float(loss.detach()) * DENOMINATOR == pytest.approx(KD_RATE * 1.25 * kd_sum, rel=1e-4)


@pytest.mark.parametrize("name", list(KD_TERMS))
def test_the_engines_ce_alone_is_the_objective_on_a_ce_only_batch_without_the_teacher(name, cross_vocab):
    """What the engine runs for a split step's CE batch equals the full objective there, loss and gradients."""
    student, teacher, objective, batch, context = build(name, cross_vocab)
    ce_only = dataclasses.replace(batch, ce=True, kd=False)
    weights = LossWeights.for_batch(kd_rate=KD_RATE, denominator=DENOMINATOR, ce_scale=1.75, kd_scale=0.0)
    params = [p for p in student.parameters() if p.requires_grad]

    def loss_and_grads(run):
        student.zero_grad(set_to_none=True)
        loss = run()
        loss.backward()
        return loss.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]

    full, full_grads = loss_and_grads(
        lambda: run_objective(objective, student, teacher, ce_only, DENOMINATOR, kd_rate=KD_RATE, weights=weights).loss
    )
    hidden = lambda: last_hidden_state(student, ce_only.student_input_ids, ce_only.student_attention_mask)  # noqa: E731

    def engine_ce():
        with weighting(weights) as weighing:
            return weighing.loss(student_ce_terms(context.student_head, ce_only, hidden(), context.chunk_size))

    alone, alone_grads = loss_and_grads(engine_ce)
    student.zero_grad(set_to_none=True)
    assert float(alone) == pytest.approx(float(full), rel=1e-5)
    assert float(alone) * DENOMINATOR == pytest.approx((1 - KD_RATE) * 1.75 * gold_ce_sum(student, batch), rel=1e-4)
    assert any(g.abs().sum() > 0 for g in alone_grads)
    for a, f in zip(alone_grads, full_grads):
        torch.testing.assert_close(a, f, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("vocab, objective", [("same", "kd"), ("different", "dskd_v2")])
def test_an_on_policy_step_asks_the_teacher_only_about_the_samples(tmp_path, monkeypatch, vocab, objective):
    path = write_policy_job(
        tmp_path,
        vocab=vocab,
        objective=objective,
        policy="on_policy",
        steps=2,
        samples=8,
        options={"max_new_tokens": 6, "ce_on_gold": True},
    )
    asked: list[torch.Tensor] = []
    score = LocalTeacher.score

    def counting_score(self, input_ids, attention_mask, rows, request):
        asked.append(input_ids.clone())
        return score(self, input_ids, attention_mask, rows, request)

    monkeypatch.setattr(LocalTeacher, "score", counting_score)
    seen = spy_first_step(monkeypatch)
    make_job(path).distill(None)
    gold, sampled = seen["window"]
    assert (gold.ce, gold.kd, sampled.ce, sampled.kd) == (True, False, False, True)
    assert len(asked) == 2, "one teacher call per step: the samples', none for the dataset responses"
    assert torch.equal(asked[0], sampled.teacher_input_ids)
    assert all(
        math.isfinite(line["train/ce"]) and math.isfinite(line["train/loss"]) for line in metrics(tmp_path / "run")
    )
