"""`index` aligner (ULD's pure index alignment, spec §9.2 step 1), and how a run picks an objective's default
aligner (`build_aligner`)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from cross_vocab_models import make_batch, tokenizer

from dskd.config import AlignerConfig, Config, ObjectiveConfig
from dskd.errors import DataError
from dskd.plugins.aligners.index import dskd_register_aligners, index
from dskd.plugins.objectives.mined_kd import mined_kd
from dskd.plugins.objectives.uld import uld
from dskd.registry import Registry
from dskd.run.components import build_aligner

TEXT = "Hello wörld 😀\nagain"


@pytest.fixture(scope="module")
def aligner():
    return index(tokenizer("tinyllama"), tokenizer("gpt2"))


def encode(name: str, text: str = TEXT) -> list[int]:
    return tokenizer(name)(text, add_special_tokens=False)["input_ids"]


def test_index_pairs_position_k_with_position_k_up_to_the_shorter_sequence(aligner):
    teacher, student = encode("tinyllama"), encode("gpt2")
    assert len(teacher) == 12 and len(student) == 8  # the two tokenizations differ in length
    pairs = aligner.align(teacher, student).pairs
    assert pairs.dtype == np.int64 and pairs.tolist() == [[k, k] for k in range(8)]
    # The other way round (student longer), and tensors instead of lists.
    pairs = aligner.align(torch.tensor(teacher[:3]), torch.tensor(student)).pairs
    assert pairs.tolist() == [[0, 0], [1, 1], [2, 2]]


def test_index_aligns_nothing_when_either_sequence_is_empty(aligner):
    assert aligner.align([], encode("gpt2")).pairs.shape == (0, 2)
    assert aligner.align(encode("tinyllama"), np.array([], dtype=np.int64)).pairs.shape == (0, 2)


@pytest.mark.parametrize("teacher_ids,message", [([5, -100, 7], "id -100"), ([[1, 2]], "1-D"), ([32000], "id 32000")])
def test_index_refuses_ids_that_are_not_one_sequence_of_the_tokenizers_tokens(aligner, teacher_ids, message):
    with pytest.raises(DataError, match=message) as info:
        aligner.align(teacher_ids, [1, 2])
    assert "\n" not in str(info.value)


def test_index_aligner_survives_pickling_for_data_loader_workers(aligner):
    clone = pickle.loads(pickle.dumps(aligner))
    teacher, student = encode("tinyllama"), encode("gpt2")
    assert np.array_equal(clone.align(teacher, student).pairs, aligner.align(teacher, student).pairs)


def test_index_aligned_rows_pair_the_kth_response_token_of_each_sequence(aligner):
    batch = make_batch(aligner)
    expected = []
    t_offset = s_offset = 0
    for b in range(batch.size):
        n_t = int((batch.teacher_labels[b] != -100).sum())
        n_s = int((batch.student_labels[b] != -100).sum())
        expected += [[t_offset + k, s_offset + k] for k in range(min(n_t, n_s))]
        t_offset, s_offset = t_offset + n_t, s_offset + n_s
    assert batch.aligned_rows.tolist() == expected
    assert any(  # the sequences differ in length both ways, so some tokens of each side stay unpaired
        int((batch.teacher_labels[b] != -100).sum()) > int((batch.student_labels[b] != -100).sum())
        for b in range(batch.size)
    ) and any(
        int((batch.teacher_labels[b] != -100).sum()) < int((batch.student_labels[b] != -100).sum())
        for b in range(batch.size)
    )


def test_index_vocab_map_sends_a_teacher_token_to_the_student_token_with_the_same_text(aligner):
    vocab_map = aligner.vocab_map()
    t_tok, s_tok = tokenizer("tinyllama"), tokenizer("gpt2")
    assert vocab_map.shape == (len(t_tok),) and vocab_map.dtype == torch.int64
    assert int(vocab_map[t_tok.convert_tokens_to_ids("▁the")]) == s_tok.convert_tokens_to_ids("Ġthe")
    assert int(vocab_map[t_tok.eos_token_id]) == s_tok.eos_token_id
    assert int(vocab_map[t_tok.bos_token_id]) == -1


def test_index_registers_under_its_name():
    registered = {}
    dskd_register_aligners(lambda name, factory: registered.__setitem__(name, factory))
    assert registered == {"index": index}


# -- build_aligner: the objective's default aligner ------------------------------------------------------------


class Recorder:
    """An aligner factory that records which name built it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, teacher_tokenizer, student_tokenizer):
        return self.name


def sft_like(context):  # an objective factory that declares no default aligner
    raise AssertionError("not called by build_aligner")


def with_declaration(factory, **declared):
    for key, value in declared.items():
        setattr(factory, key, value)
    return factory


REGISTRY = Registry(
    # eta declares itself the default across vocabularies, as the built-in does.
    aligners={n: with_declaration(Recorder(n), default=n == "eta") for n in ("eta", "index", "mined")},
    objectives={"uld": uld, "mined_kd": mined_kd, "kd": sft_like},
)


@pytest.mark.parametrize(
    "configured,objective,same_vocab,expected",
    [
        ("", "uld", False, "index"),  # the objective's declared default
        ("", "mined_kd", False, "mined"),
        ("", "uld", True, "index"),  # declared defaults apply to a shared vocabulary too
        ("eta", "uld", False, "eta"),  # a configured aligner always wins
        ("", "kd", False, "eta"),  # no default declared: the previous rule
        ("", "kd", True, None),
        ("", None, False, "eta"),  # no objective given (the evaluation stage)
    ],
)
def test_build_aligner_uses_the_objectives_default_only_when_none_is_configured(
    configured, objective, same_vocab, expected
):
    config = Config(aligner=AlignerConfig(name=configured), objective=ObjectiveConfig(name=objective or "kd"))
    built = build_aligner(config, REGISTRY, None, None, same_vocab, objective=objective)
    # A built aligner comes wrapped so that its pairs are checked (`dskd.run.plugin_checks.CheckedAligner`).
    assert (None if built is None else built.aligner) == expected
