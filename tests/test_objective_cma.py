"""`dskd_cma`: the cross-model attention's masks, and the objective's terms and gradients against a dense oracle.

The oracle follows spec §8.1 (v1) on the padded `(B, T, ...)` tensors, written from the formulas and sharing
no code with the plugin: label positions "formalised" to id 0 before the embedding lookups, keys and values
from the teacher's embeddings and hidden states, the reference's *additive* -1e5 mask, both softmaxes, the
models' own hidden states and logits, and float64 softmax/KL. Its only departures from the reference are the
project's documented ones (plugin docstring): std normalisers over the label positions, the configured
divergence in teacher space, and one global denominator:

    L = [(1 - a) CE + a (projector_ce + kd_student_space + kd_teacher_space)] / D.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
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
)
from objective_checks import divergence_oracle

from dskd.errors import ModelError, PluginError
from dskd.kit.cross_model_attention import attention_weights, padded, sequence_has
from dskd.plugins.aligners.index import index
from dskd.plugins.divergences.forward_kl import forward_kl
from dskd.plugins.divergences.reverse_kl import reverse_kl
from dskd.plugins.objectives.dskd_cma import dskd_cma

DENOMINATOR = 19.0  # not the local token count, so a locally normalised term would show
DIVERGENCES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl}


def oracle(student, teacher, projectors, batch, *, divergence: str, temperature: float, kd_rate: float):
    y_s, y_t = batch.student_labels, batch.teacher_labels
    m_s, m_t = y_s != -100, y_t != -100
    out_s = student(
        input_ids=batch.student_input_ids,
        attention_mask=batch.student_attention_mask,
        output_hidden_states=True,
        use_cache=False,
    )
    with torch.no_grad():
        out_t = teacher(
            input_ids=batch.teacher_input_ids,
            attention_mask=batch.teacher_attention_mask,
            output_hidden_states=True,
            use_cache=False,
        )
    h_s, z_s, h_t, z_t = out_s.hidden_states[-1], out_s.logits, out_t.hidden_states[-1], out_t.logits
    emb_s, emb_t = student.get_input_embeddings().weight.detach(), teacher.get_input_embeddings().weight

    def formal(ids, mask):
        return torch.where(mask, ids, torch.zeros_like(ids))

    e_s = torch.cat([emb_s[formal(batch.student_input_ids, m_s)], emb_s[formal(y_s, m_s)]], -1)
    e_t_y = emb_t[formal(y_t, m_t)]
    e_t = torch.cat([emb_t[formal(batch.teacher_input_ids, m_t)], e_t_y], -1)
    # The project's normalisers: one std over the label positions of the micro-batch.
    key = e_t / e_t[m_t].std()
    values_t2s = projectors.t2s(h_t / h_t[m_t].std() + e_t_y / e_t_y[m_t].std())
    values_s2t = projectors.s2t(h_s)
    scores = projectors.query(e_s) @ key.transpose(-1, -2) / math.sqrt(2 * h_t.shape[-1])
    scores = scores + (1.0 - (m_s[:, :, None] & m_t[:, None, :]).float()) * -1e5
    z_t2s = (torch.softmax(scores, -1) @ values_t2s) @ student.lm_head.weight.detach().T
    z_s2t = (torch.softmax(scores.transpose(1, 2), -1) @ values_s2t) @ teacher.lm_head.weight.T
    gold = y_s[m_s]
    agree = z_t2s[m_s].argmax(-1) == gold
    out = {
        "ce": -log_softmax64(z_s[m_s]).gather(-1, gold[:, None]).sum(),
        "projector_ce": -log_softmax64(z_t2s[m_s]).gather(-1, gold[:, None]).sum(),
        "kd_student_space": (divergence_oracle(divergence, z_s[m_s], z_t2s[m_s].detach(), temperature) * agree).sum(),
        "kd_teacher_space": divergence_oracle(divergence, z_s2t[m_t], z_t[m_t], temperature).sum(),
        "n_agree": int(agree.sum()),
    }
    kd = out["projector_ce"] + out["kd_student_space"] + out["kd_teacher_space"]
    out["loss"] = ((1 - kd_rate) * out["ce"] + kd_rate * kd) / DENOMINATOR
    return out


def frequent_gold_token(batch) -> int:
    return int(torch.mode(batch.student_labels[batch.student_labels != -100]).values)


@pytest.fixture(scope="module")
def setup():
    student, teacher = models("gpt2", "tinyllama")
    batch = make_batch(index(tokenizer("tinyllama"), tokenizer("gpt2")))
    # The most frequent gold token gets the longest head row, so that a t2s bias along that row makes the
    # projected teacher predict it (`agreeing_objective`): in 16 dimensions a random row is never extreme
    # enough for that among 50,257.
    with torch.no_grad():
        rows = student.lm_head.weight
        token = frequent_gold_token(batch)
        rows[token] *= 3 * rows.norm(dim=1).max() / rows[token].norm()
    return student, teacher, batch


def agreeing_objective(context, batch):
    """The objective, with t2s biased towards the most frequent gold token: the agreement gate then keeps
    some student-space KD tokens and drops others (with random projectors it would drop all of them, and
    the gated term would test nothing)."""
    objective = dskd_cma(context)
    direction = context.student_head.weight[frequent_gold_token(batch)].detach()
    with torch.no_grad():
        objective.projectors.t2s.bias.copy_(5.0 * direction / direction.norm())
    return objective


@pytest.mark.parametrize("divergence,temperature,chunk_size", [("forward_kl", 1.0, 4), ("reverse_kl", 2.0, 64)])
def test_dskd_cma_terms_and_gradients_match_the_dense_oracle(setup, divergence, temperature, chunk_size):
    student, teacher, batch = setup
    context = make_context(
        student,
        teacher,
        divergence=DIVERGENCES[divergence],
        temperature=temperature,
        chunk_size=chunk_size,
    )
    objective = agreeing_objective(context, batch)
    params = {f"student.{n}": p for n, p in student.named_parameters()}
    params.update({f"projector.{n}": p for n, p in objective.trainable_modules().named_parameters()})
    result = run_objective(objective, student, teacher, batch, DENOMINATOR, kd_rate=0.3)
    got = gradients(params, result.loss)
    ref = oracle(
        student,
        teacher.model,
        objective.projectors,
        batch,
        divergence=divergence,
        temperature=temperature,
        kd_rate=0.3,
    )
    expected = gradients(params, ref["loss"])
    n_student, n_teacher = (
        int((batch.student_labels != -100).sum()),
        int((batch.teacher_labels != -100).sum()),
    )
    assert 0 < ref["n_agree"] < n_student
    assert int(result.counts["kd_student_space"]) == ref["n_agree"] == int(result.sums["t2s_agreement"])
    assert int(result.counts["projector_ce"]) == n_student and int(result.counts["kd_teacher_space"]) == n_teacher
    for term in ("ce", "projector_ce", "kd_student_space", "kd_teacher_space"):
        assert_rel(result.sums[term], ref[term], what=term)
    assert_rel(result.loss, ref["loss"], what="loss")
    for name in expected:
        assert_rel(got[name], expected[name], what=f"grad {name}")
    # All three projectors are trained (spec §14.6: the v2 repository never optimised the query projector).
    for name in ("query.weight", "query.bias", "t2s.weight", "t2s.bias", "s2t.weight", "s2t.bias"):
        assert got[f"projector.{name}"].abs().max() > 0, name


def test_dskd_cma_gives_prompt_and_padding_positions_no_attention_weight(setup):
    _, _, batch = setup
    (b, t_s), t_t = batch.student_labels.shape, batch.teacher_labels.shape[1]
    gen = torch.Generator().manual_seed(0)
    query, key = torch.randn(b, t_s, 6, generator=gen) * 5, torch.randn(b, t_t, 6, generator=gen) * 5
    m_s, m_t = batch.student_labels != -100, batch.teacher_labels != -100
    # The batch really has prompt and padding on both sides.
    assert (~m_s).any(dim=1).all() and (~batch.student_attention_mask.bool()).any()
    assert (~batch.teacher_attention_mask.bool()).any()
    t2s, s2t = attention_weights(query, key, m_s, m_t)
    # A labelled student position spreads all its weight over labelled teacher positions, and vice versa.
    assert torch.all(t2s[m_s][~m_t.repeat_interleave(m_s.sum(1), 0)] == 0)
    assert torch.all(s2t[m_t][~m_s.repeat_interleave(m_t.sum(1), 0)] == 0)
    assert_rel(t2s[m_s].sum(-1), torch.ones(int(m_s.sum())), tol=1e-6, what="t2s rows")
    assert_rel(s2t[m_t].sum(-1), torch.ones(int(m_t.sum())), tol=1e-6, what="s2t rows")
    # The weights over the labelled positions are the plain softmax of those scores alone.
    for i in range(b):
        scores = query[i][m_s[i]] @ key[i][m_t[i]].T / math.sqrt(6)
        assert_rel(t2s[i][m_s[i]][:, m_t[i]], torch.softmax(scores, -1), tol=1e-6, what=f"sequence {i}")


def test_dskd_cma_rows_round_trip_through_the_padded_layout(setup):
    _, _, batch = setup
    b, t_s = batch.student_labels.shape
    rows = torch.arange(batch.student_rows.numel() * 2, dtype=torch.float32).reshape(-1, 2)
    grid = padded(rows, batch.student_rows, b, t_s)
    m_s = batch.student_labels != -100
    assert torch.equal(grid[m_s], rows) and torch.all(grid[~m_s] == 0)


def test_dskd_cma_drops_rows_whose_other_sequence_has_no_label(setup):
    student, teacher, batch = setup
    teacher_labels = batch.teacher_labels.clone()
    teacher_labels[1] = -100  # sequence 1 loses every teacher label
    cut = replace(batch, teacher_labels=teacher_labels).index_rows()
    has = sequence_has(cut.teacher_labels != -100, cut.student_rows, cut.student_labels.shape[1])
    per_sequence = torch.div(cut.student_rows, cut.student_labels.shape[1], rounding_mode="floor")
    assert torch.equal(has, per_sequence != 1)
    objective = dskd_cma(make_context(student, teacher, divergence=forward_kl))
    result = run_objective(objective, student, teacher, cut, DENOMINATOR, kd_rate=0.5)
    assert int(result.counts["projector_ce"]) == int(has.sum()) < int(result.counts["ce"])
    assert torch.isfinite(result.loss)


# -- setup refusals --------------------------------------------------------------------------------------------


def test_dskd_cma_refuses_a_teacher_without_input_embeddings(setup):
    student, teacher, _ = setup

    class RemoteLike:  # what a gRPC teacher offers: tokenizer, head, hidden states, no embeddings
        tokenizer, head, capabilities = teacher.tokenizer, teacher.head, teacher.capabilities

    with pytest.raises(ModelError, match='"dskd_v2" with aligner "eta"') as info:
        dskd_cma(make_context(student, RemoteLike(), divergence=forward_kl))
    assert "\n" not in str(info.value)


def test_dskd_cma_refuses_teacher_embeddings_narrower_than_its_hidden_states(setup):
    student, teacher, _ = setup

    class Narrow:
        tokenizer, head, capabilities = teacher.tokenizer, teacher.head, teacher.capabilities
        embeddings = teacher.embeddings[:, :-1]

    with pytest.raises(ModelError, match="input embeddings have shape"):
        dskd_cma(make_context(student, Narrow(), divergence=forward_kl))


def test_dskd_cma_refuses_a_run_without_a_teacher_or_hidden_states(setup):
    student, teacher, _ = setup
    context = make_context(student, teacher, divergence=forward_kl)
    with pytest.raises(PluginError, match="needs a teacher"):
        dskd_cma(replace(context, teacher=None))

    class TopKOnly:
        tokenizer, head, capabilities, embeddings = (
            teacher.tokenizer,
            teacher.head,
            frozenset({"top_k"}),
            teacher.embeddings,
        )

    with pytest.raises(PluginError, match="hidden states"):
        dskd_cma(replace(context, teacher=TopKOnly()))


def test_local_teacher_offers_its_input_embeddings_detached(setup):
    _, teacher, _ = setup
    weight = teacher.model.get_input_embeddings().weight
    assert teacher.embeddings.data_ptr() == weight.data_ptr() and not teacher.embeddings.requires_grad
    assert tuple(teacher.embeddings.shape) == (len(tokenizer("tinyllama")), teacher.hidden_size)


def test_dskd_cma_query_projector_sees_the_student_embedding_width(setup):
    student, teacher, _ = setup
    objective = dskd_cma(make_context(student, teacher, divergence=forward_kl))
    p = objective.projectors
    d_s, d_t = student.config.n_embd, teacher.hidden_size
    assert (p.query.in_features, p.query.out_features) == (2 * d_s, 2 * d_t)
    assert (p.t2s.in_features, p.t2s.out_features, p.s2t.in_features, p.s2t.out_features) == (
        d_t,
        d_s,
        d_s,
        d_t,
    )
