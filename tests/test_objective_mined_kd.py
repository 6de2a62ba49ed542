"""`mined_kd`: the student->teacher id table, the transformed teacher logits, and the objective's loss and
gradients against a dense oracle.

The oracle follows spec §9.1 steps 4-7 per sequence and position: it starts every target row from -1e5 over
the student vocabulary, writes the teacher's logit of `stu2tea[s]` into every mapped student id `s` for a
student position the aligner paired with a teacher position, writes 100 at the gold token for an unpaired
one, and takes forward KL in float64 from the models' own logits:

    L = [(1 - a) CE + a sum FKL(z_s, z~_t)] / D.

Teacher Mistral, student TinyLlama: the spec's own pair for MinED, and one whose 32,000-token vocabularies
map in about two seconds (GPT-2 -> TinyLlama takes eight).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
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

from dskd.errors import ModelError, PluginError
from dskd.plugins.aligners.index import index
from dskd.plugins.aligners.mined import mined
from dskd.plugins.divergences.forward_kl import forward_kl
from dskd.plugins.objectives.kd import kd
from dskd.plugins.objectives.mined_kd import (
    GOLD_LOGIT,
    MASKED_LOGIT,
    mined_kd,
    student_to_teacher,
    transformed_teacher_logits,
)

DENOMINATOR = 17.0  # not the local token count, so a locally normalised term would show
STUDENT, TEACHER = "tinyllama", "mistral"


# -- the id table and the transformed logits, on hand-made vocabularies -----------------------------------------------


def test_student_to_teacher_keeps_one_teacher_id_per_student_id_preferring_exact_non_byte_tokens():
    # teacher id:          0  1  2  3   4  5  6
    vocab_map = np.array([1, 1, 3, -1, 0, 3, 3])
    exact = np.array([-1, 1, -1, -1, 0, 3, 3])  # teacher 1, 4, 5, 6 have the same bytes as their student id
    byte_piece = np.array([False, False, False, False, False, True, False])  # teacher 5 is a <0xNN> piece
    table = student_to_teacher(vocab_map, 5, exact, byte_piece)
    # student 0 <- teacher 4 (only one); student 1 <- teacher 1 (exact beats the lower id 0);
    # student 2 <- nobody; student 3 <- teacher 6 (exact and not a byte piece, beats 2 and 5); student 4 <- nobody.
    assert table.tolist() == [4, 1, -1, 6, -1]


def test_student_to_teacher_takes_the_lowest_teacher_id_without_byte_information():
    assert student_to_teacher(np.array([2, 0, 2, 0, 7]), 4).tolist() == [1, -1, 0, -1]  # 7 is out of range


def test_transformed_teacher_logits_move_mapped_columns_and_one_hot_unpaired_rows():
    teacher_logits = torch.tensor([[0.5, 1.5, 2.5, 3.5, 4.5], [-1.0, -2.0, -3.0, -4.0, -5.0]])
    stu2tea = torch.tensor([2, -1, 0, 4])  # student ids 0..3; student 1 has no teacher id
    labels = torch.tensor([3, 1])
    paired = torch.tensor([True, False])
    got = transformed_teacher_logits(teacher_logits, stu2tea, labels, paired)
    m = MASKED_LOGIT
    expected = torch.tensor(
        [
            [2.5, m, 0.5, 4.5],  # row 0: z_t[0, stu2tea[s]]
            [m, GOLD_LOGIT, m, m],
        ]
    )  # row 1 is unpaired: one-hot at its gold token 1
    assert torch.equal(got, expected)
    assert (MASKED_LOGIT, GOLD_LOGIT) == (-1e5, 100.0)  # the reference's values (spec §9.1)


# -- the objective against the oracle ------------------------------------------------------------------------------


def oracle(student, teacher, batch, stu2tea: torch.Tensor, *, temperature: float, kd_rate: float, skip: bool = False):
    out_s = student(
        input_ids=batch.student_input_ids, attention_mask=batch.student_attention_mask, use_cache=False
    ).logits
    with torch.no_grad():
        out_t = teacher(
            input_ids=batch.teacher_input_ids, attention_mask=batch.teacher_attention_mask, use_cache=False
        ).logits
    partner = {(int(b), int(s)): int(t) for b, t, s in batch.alignment.tolist()}  # label positions
    mapped = torch.nonzero(stu2tea >= 0).reshape(-1)
    ce, kd, n_kd = 0.0, 0.0, 0
    for b, s in torch.nonzero(batch.student_labels != -100).tolist():
        z_s, gold = out_s[b, s], int(batch.student_labels[b, s])
        ce = ce - log_softmax64(z_s)[gold]
        target = torch.full((z_s.shape[0],), -1e5, dtype=torch.float64)
        if (b, s) in partner:
            target[mapped] = out_t[b, partner[(b, s)], stu2tea[mapped]].double()
        elif skip:
            continue
        else:
            target[gold] = 100.0
        log_p_t, log_p_s = log_softmax64(target, temperature), log_softmax64(z_s, temperature)
        kd = kd + (torch.exp(log_p_t) * (log_p_t - log_p_s)).sum()
        n_kd += 1
    return {"ce": ce, "kd": kd, "n_kd": n_kd, "loss": ((1 - kd_rate) * ce + kd_rate * kd) / DENOMINATOR}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    student, teacher = models(STUDENT, TEACHER, student_scale=8.0, teacher_scale=4.0)
    aligner = mined(tokenizer(TEACHER), tokenizer(STUDENT), cache_dir=str(tmp_path_factory.mktemp("mined")))
    return student, teacher, aligner, make_batch(aligner, STUDENT, TEACHER)


@pytest.mark.parametrize("temperature,chunk_size,unaligned", [(1.0, 4, "gold"), (2.0, 64, "gold"), (1.0, 5, "skip")])
def test_mined_kd_loss_terms_and_gradients_match_the_dense_oracle(setup, temperature, chunk_size, unaligned):
    student, teacher, aligner, batch = setup
    context = make_context(
        student,
        teacher,
        STUDENT,
        divergence=forward_kl,
        temperature=temperature,
        chunk_size=chunk_size,
        aligner=aligner,
    )
    objective = mined_kd(context, unaligned=unaligned)
    params = dict(student.named_parameters())
    result = run_objective(objective, student, teacher, batch, DENOMINATOR, kd_rate=0.4)
    got = gradients(params, result.loss)
    ref = oracle(
        student,
        teacher.model,
        batch,
        objective.stu2tea.cpu(),
        temperature=temperature,
        kd_rate=0.4,
        skip=unaligned == "skip",
    )
    expected = gradients(params, ref["loss"])
    n_student = int((batch.student_labels != -100).sum())
    # The batch holds both paired and unpaired student tokens.
    assert 0 < batch.aligned_rows.shape[0] < n_student
    assert (
        int(result.counts["kd"]) == ref["n_kd"] == (n_student if unaligned == "gold" else batch.aligned_rows.shape[0])
    )
    for term in ("ce", "kd"):
        assert_rel(result.sums[term], ref[term], what=term)
    assert_rel(result.loss, ref["loss"], what="loss")
    for name in expected:
        assert_rel(got[name], expected[name], what=f"grad {name}")


def test_mined_kd_id_table_follows_the_aligners_vocabulary_map(setup):
    student, teacher, aligner, _ = setup
    objective = mined_kd(make_context(student, teacher, STUDENT, divergence=forward_kl, aligner=aligner))
    stu2tea = objective.stu2tea.cpu()
    vocab_map = aligner.vocab_map()
    kept = torch.nonzero(stu2tea >= 0).reshape(-1)
    assert torch.equal(vocab_map[stu2tea[kept]], kept)  # each kept teacher id maps to its student id
    # ...and every student id that some teacher id maps to has one.
    reached = torch.unique(vocab_map[(vocab_map >= 0) & (vocab_map < len(tokenizer(STUDENT)))])
    assert torch.equal(kept, reached)
    # Real tokens with the same text keep their own teacher token: "▁the" -> "▁the".
    the_s, the_t = (
        tokenizer(STUDENT).convert_tokens_to_ids("▁the"),
        tokenizer(TEACHER).convert_tokens_to_ids("▁the"),
    )
    assert int(stu2tea[the_s]) == the_t


def test_mined_kd_on_one_shared_vocabulary_without_an_aligner_is_vanilla_kd():
    # Every id is its own partner and every token is paired, so the transformed logits are the teacher's.
    student, teacher = models("gpt2", "gpt2", student_scale=8.0, teacher_scale=4.0)
    batch = make_batch(None, "gpt2", "gpt2")
    losses = []
    with torch.no_grad():
        for factory in (mined_kd, kd):
            context = make_context(student, teacher, divergence=forward_kl, temperature=2.0, same_vocab=True)
            losses.append(run_objective(factory(context), student, teacher, batch, DENOMINATOR, kd_rate=0.5).loss)
    assert_rel(losses[0], losses[1], what="loss")


# -- setup refusals --------------------------------------------------------------------------------------------


def test_mined_kd_declares_the_mined_aligner_as_its_default():
    assert mined_kd.default_aligner == "mined"


def test_mined_kd_refuses_a_run_without_a_teacher(setup):
    student, teacher, aligner, _ = setup
    with pytest.raises(PluginError, match="needs a teacher"):
        mined_kd(replace(make_context(student, teacher, STUDENT, divergence=forward_kl, aligner=aligner), teacher=None))


def test_mined_kd_refuses_an_aligner_without_a_vocabulary_map(setup):
    student, teacher, _, _ = setup

    class PairsOnly:
        def align(self, teacher_ids, student_ids):
            raise AssertionError("not called at setup")

    with pytest.raises(ModelError, match='aligner.name = "mined"'):
        mined_kd(make_context(student, teacher, STUDENT, divergence=forward_kl, aligner=PairsOnly()))


def test_mined_kd_refuses_a_vocabulary_map_that_reaches_no_student_token(setup):
    student, teacher, _, _ = setup

    class EmptyMap:
        def vocab_map(self):
            return torch.full((len(tokenizer(TEACHER)),), -1)

    with pytest.raises(ModelError, match="no teacher token"):
        mined_kd(make_context(student, teacher, STUDENT, divergence=forward_kl, aligner=EmptyMap()))


def test_mined_kd_refuses_an_unknown_unaligned_option(setup):
    student, teacher, aligner, _ = setup
    with pytest.raises(PluginError, match='"gold" or "skip"'):
        mined_kd(make_context(student, teacher, STUDENT, divergence=forward_kl, aligner=aligner), unaligned="drop")


def test_mined_kd_accepts_the_index_aligners_exact_map(setup):
    # Any aligner with a vocabulary map works; the index aligner's is the exact-bytes one.
    student, teacher, _, _ = setup
    aligner = index(tokenizer(TEACHER), tokenizer(STUDENT))
    objective = mined_kd(make_context(student, teacher, STUDENT, divergence=forward_kl, aligner=aligner))
    assert int((objective.stu2tea >= 0).sum()) > 20000  # Mistral and TinyLlama share most of their pieces
