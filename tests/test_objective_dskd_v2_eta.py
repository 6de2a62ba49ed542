"""DSKDv2 across vocabularies (DSKDv2 + ETA, spec §6.3-6.4 with the global normalisation of §0) against a
dense computation written independently from the formulas, on real tokenizers and a real ETA alignment."""

from __future__ import annotations

import functools

import numpy as np
import torch
from cross_vocab_models import (
    assert_rel,
    gradients,
    log_softmax64,
    make_batch,
    make_context,
    models,
    run_objective,
    tokenizer,
    valid_outputs,
)

from dskd.plugins.aligners.eta import eta
from dskd.plugins.divergences.forward_kl import forward_kl
from dskd.plugins.objectives.dskd_v2 import dskd_v2

TAU = 2.0
ALPHA = 0.4


def fkl64(student_logits, teacher_logits, tau=TAU):
    """KL(p_t || p_s) per row, float64, from the definition."""
    log_s, log_t = log_softmax64(student_logits, tau), log_softmax64(teacher_logits, tau)
    return (log_t.exp() * (log_t - log_s)).sum(-1)


def ce64(logits, labels):
    return -log_softmax64(logits).gather(-1, labels[:, None]).squeeze(-1)


def oracle(student, teacher, objective, batch, denominator):
    """The DSKDv2-ETA loss, sequence by sequence, pair by pair, in float64."""
    s_tok = tokenizer("gpt2")
    w_s = student.get_output_embeddings().weight[: len(s_tok)]
    w_t = teacher.model.get_output_embeddings().weight[: teacher.vocab_size].detach()
    proj = objective.projectors.t2s.weight  # (d_s, d_t), trained
    # A = S' pinv(T') from the *current* student head on the shared vocabulary, independent of the objective.
    shared = objective.shared
    s_rows = w_s.detach().double()[shared.student_ids].T
    t_rows = w_t.double()[shared.teacher_ids].T
    a = s_rows @ torch.linalg.pinv(t_rows)  # (d_s, d_t)
    vocab_map = objective.vocab_map
    ce_total = torch.zeros((), dtype=torch.float64)
    kd_total = torch.zeros((), dtype=torch.float64)
    for b in range(batch.size):
        h_s, z_s, y_s = valid_outputs(
            student, batch.student_input_ids, batch.student_attention_mask, batch.student_labels, b
        )
        with torch.no_grad():
            h_t, _, _ = valid_outputs(
                teacher.model, batch.teacher_input_ids, batch.teacher_attention_mask, batch.teacher_labels, b
            )
        ce_total = ce_total + ce64(z_s, y_s).sum()
        # Label-position pairs of this sequence -> indices into its valid rows.
        s_first = int((batch.student_labels[b] != -100).nonzero()[0])
        t_first = int((batch.teacher_labels[b] != -100).nonzero()[0])
        for _, t_pos, s_pos in batch.alignment[batch.alignment[:, 0] == b].tolist():
            i, j = t_pos - t_first, s_pos - s_first
            zt = h_t[i].double() @ w_t.double().T
            label = int(vocab_map[int(zt.argmax())])
            if label < 0:
                continue  # the teacher's top-1 has no student token: the pair carries nothing (spec §6.3)
            z_t2s = (proj.double() @ h_t[i].double()) @ w_s.detach().double().T
            t2s_ce = ce64(z_t2s[None], torch.tensor([label]))[0]
            agree = int(z_t2s.argmax()) == label
            t2s_kd = fkl64(z_s[j][None], z_t2s.detach()[None])[0] if agree else 0.0
            z_s2t = (h_s[j].double() @ a) @ w_t.double().T  # h_s A: student space -> teacher space
            s2t_kd = fkl64(z_s2t[None], zt[None])[0]
            kd_total = kd_total + t2s_ce + t2s_kd + s2t_kd
    return ((1 - ALPHA) * ce_total + ALPHA * kd_total) / denominator


def test_dskd_v2_eta_loss_and_gradients_equal_a_dense_computation_from_the_formulas():
    student, teacher = models("gpt2", "tinyllama")
    aligner = eta(tokenizer("tinyllama"), tokenizer("gpt2"))
    batch = make_batch(aligner)
    assert batch.aligned_rows.shape[0] > 0
    divergence = functools.partial(forward_kl)
    context = make_context(student, teacher, divergence=divergence, temperature=TAU, chunk_size=3, aligner=aligner)
    objective = dskd_v2(context)
    denominator = float(batch.num_student_tokens()) * 1.5  # any global count, e.g. from other micro-batches
    params = {**{f"student.{n}": p for n, p in student.named_parameters()}, "t2s": objective.projectors.t2s.weight}

    terms = run_objective(objective, student, teacher, batch, denominator, kd_rate=ALPHA)
    got = gradients(params, terms.loss)
    expected_loss = oracle(student, teacher, objective, batch, denominator)
    want = gradients(params, expected_loss)
    assert_rel(terms.loss, expected_loss, what="loss")
    for name in params:
        assert_rel(got[name], want[name], tol=1e-5, what=name)
    assert torch.count_nonzero(want["t2s"]) > 0  # the projector CE reached the projector


def test_pairs_whose_teacher_prediction_has_no_student_token_carry_no_kd_and_the_metrics_say_so():
    student, teacher = models("gpt2", "tinyllama")
    aligner = eta(tokenizer("tinyllama"), tokenizer("gpt2"))
    batch = make_batch(aligner)

    class NothingInCommon:
        """The alignment of eta, but no teacher token has a student counterpart."""

        def align(self, t, s):
            return aligner.align(t, s)

        def vocab_map(self):
            return torch.full((teacher.vocab_size,), -1, dtype=torch.long)

    context = make_context(student, teacher, divergence=forward_kl, temperature=TAU, aligner=NothingInCommon())
    objective = dskd_v2(context)
    assert len(objective.shared) == 0 and not torch.count_nonzero(objective.s2t_weight)
    denominator = float(batch.num_student_tokens())
    terms = run_objective(objective, student, teacher, batch, denominator, kd_rate=ALPHA)
    # Only the gold CE remains, weighted (1 - kd_rate) like any step (spec §1.3).
    assert torch.isclose(terms.loss, (1 - ALPHA) * terms.sums["ce"] / denominator)
    assert (
        float(terms.sums["accepted_pairs"]) == 0.0
        and float(terms.counts["accepted_pairs"]) == batch.aligned_rows.shape[0]
    )
    assert float(terms.counts["kd_teacher_space"]) == 0.0  # the term has no tokens, so the engine does not log it
    terms.loss.backward()
    assert np.isfinite(float(terms.loss.detach()))


def test_a_micro_batch_with_no_aligned_pair_trains_the_ce_alone():
    student, teacher = models("gpt2", "tinyllama")
    aligner = eta(tokenizer("tinyllama"), tokenizer("gpt2"))

    class NoPairs:
        def align(self, t, s):
            return type(aligner.align(t, s))(np.zeros((0, 2), dtype=np.int64))

        def vocab_map(self):
            return aligner.vocab_map()

    batch = make_batch(NoPairs())
    assert batch.aligned_rows.shape[0] == 0
    context = make_context(student, teacher, divergence=forward_kl, aligner=NoPairs())
    terms = run_objective(dskd_v2(context), student, teacher, batch, float(batch.num_student_tokens()), kd_rate=ALPHA)
    assert torch.isclose(terms.loss, (1 - ALPHA) * terms.sums["ce"] / batch.num_student_tokens())
    terms.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
