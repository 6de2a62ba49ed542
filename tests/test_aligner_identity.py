"""`identity`: same-vocabulary alignment pairs equal positions, refuses different vocabularies."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from dskd.errors import DataError, PluginError
from dskd.plugins.aligners import identity as identity_module

TOKENIZERS = Path(__file__).resolve().parents[1] / "examples" / "tokenizers"


@lru_cache(maxsize=None)
def tokenizer(name: str):
    return AutoTokenizer.from_pretrained(TOKENIZERS / name)


def test_pairs_every_position_both_sequences_have():
    aligner = identity_module.identity(tokenizer("tinyllama"), tokenizer("tinyllama"))
    pairs = aligner.align([5, 6, 7, 2], torch.tensor([5, 6, 2])).pairs
    assert pairs.dtype.kind == "i" and pairs.tolist() == [[0, 0], [1, 1], [2, 2]]
    assert len(aligner.align([], [1, 2])) == 0


def test_two_loads_of_one_tokenizer_count_as_one_vocabulary():
    again = AutoTokenizer.from_pretrained(TOKENIZERS / "gpt2")
    assert len(identity_module.identity(tokenizer("gpt2"), again).align([1, 2], [1, 2])) == 2


@pytest.mark.parametrize(("teacher", "student"), [("mistral", "tinyllama"), ("gpt2", "tinyllama")])
def test_different_vocabularies_are_refused_with_the_aligner_to_use(teacher, student):
    with pytest.raises(PluginError, match=r"aligner 'identity' needs one vocabulary.*\"eta\""):
        identity_module.identity(tokenizer(teacher), tokenizer(student))


def test_ids_outside_the_vocabulary_are_refused():
    aligner = identity_module.identity(tokenizer("tinyllama"), tokenizer("tinyllama"))
    with pytest.raises(DataError, match="student_ids holds id 32000"):
        aligner.align([1], [32000])


def test_module_registers_identity():
    registered = {}
    identity_module.dskd_register_aligners(lambda name, obj: registered.setdefault(name, obj))
    assert registered == {"identity": identity_module.identity}
