"""`tokenize_split`: columns for student and teacher, alignment of the label sequences, workers, disk cache."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from data_text_aligner import EqualTextAligner
from transformers import AutoTokenizer

from dskd.config import DataConfig
from dskd.data.examples import (
    Example,
    _PairEncoder,
    aligner_fingerprint,
    encode_example,
    load_examples,
    tokenize_split,
)
from dskd.errors import DataError, PluginError
from dskd.types import Alignment

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


class ShiftedAligner:
    """Violates the contract: returns a pair one past the end of the student labels."""

    def align(self, teacher_ids, student_ids):
        return Alignment(np.array([[0, len(student_ids)]]))


@pytest.fixture(scope="module")
def gpt2():
    return AutoTokenizer.from_pretrained(EXAMPLES / "tokenizers" / "gpt2")


@pytest.fixture(scope="module")
def llama():
    return AutoTokenizer.from_pretrained(EXAMPLES / "tokenizers" / "tinyllama")


@pytest.fixture(scope="module")
def examples():
    return load_examples(EXAMPLES / "data" / "tasks" / "valid.jsonl", DataConfig(), "valid")[:60]


def test_columns_hold_each_tokenizers_encoding_of_the_same_text(gpt2, llama, examples):
    cfg = DataConfig()
    rows = tokenize_split(examples, gpt2, llama, cfg, split="valid")
    assert rows.column_names == [
        "sample_id",
        "student_ids",
        "student_prompt_len",
        "teacher_ids",
        "teacher_prompt_len",
    ]
    for k, example in enumerate(examples):
        row = rows[k]
        assert row["sample_id"] == k
        assert (row["student_ids"], row["student_prompt_len"]) == tuple(
            encode_example(gpt2, example.prompt, example.response, cfg)
        )
        assert (row["teacher_ids"], row["teacher_prompt_len"]) == tuple(
            encode_example(llama, example.prompt, example.response, cfg)
        )


@pytest.mark.parametrize("same", ["none", "same_object", "equal_copy"])
def test_teacher_columns_repeat_the_student_ones_for_the_same_tokenizer(gpt2, examples, same):
    teacher = {"none": None, "same_object": gpt2, "equal_copy": copy.deepcopy(gpt2)}[same]
    rows = tokenize_split(examples, gpt2, teacher, DataConfig())
    assert rows["teacher_ids"] == rows["student_ids"]
    assert rows["teacher_prompt_len"] == rows["student_prompt_len"]


def test_alignment_column_is_the_aligners_pairs_over_the_label_sequences(gpt2, llama, examples):
    aligner = EqualTextAligner(llama, gpt2)
    rows = tokenize_split(examples, gpt2, llama, DataConfig(), aligner=aligner)
    total = 0
    for row in rows:
        t_labels = row["teacher_ids"][row["teacher_prompt_len"] :]
        s_labels = row["student_ids"][row["student_prompt_len"] :]
        expected = aligner.align(t_labels, s_labels).pairs
        assert np.array_equal(np.asarray(row["alignment"]).reshape(-1, 2), expected)
        total += len(expected)
        # EOS pairs with EOS: both label sequences end with it and all text before it agrees.
        assert tuple(expected[-1]) == (len(t_labels) - 1, len(s_labels) - 1)
    assert total > len(rows)  # real content aligned, not only the EOS pairs


@pytest.mark.integration
def test_workers_give_the_same_rows_as_the_main_process(gpt2, llama, examples):
    aligner = EqualTextAligner(llama, gpt2)
    here = tokenize_split(examples, gpt2, llama, DataConfig(), aligner=aligner)
    workers = tokenize_split(examples, gpt2, llama, DataConfig(), aligner=aligner, num_workers=2)
    assert workers.to_dict() == here.to_dict()


def test_cache_is_reused_until_a_tokenizer_data_aligner_or_limit_changes(gpt2, llama, examples, tmp_path, monkeypatch):
    cfg = DataConfig()
    first = tokenize_split(examples, gpt2, llama, cfg, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1

    def fail(self, batch):
        raise AssertionError("tokenised again although the cache holds this split")

    with monkeypatch.context() as patch:
        patch.setattr(_PairEncoder, "__call__", fail)
        hit = tokenize_split(examples, gpt2, copy.deepcopy(llama), cfg, cache_dir=tmp_path)
    assert hit.to_dict() == first.to_dict()

    changed = copy.deepcopy(llama)
    changed.add_tokens(["<new-piece>"])
    tokenize_split(examples, gpt2, changed, cfg, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2
    edited = examples[:-1] + [Example(examples[-1].prompt, ("other",))]
    tokenize_split(edited, gpt2, llama, cfg, cache_dir=tmp_path)
    tokenize_split(examples, gpt2, llama, DataConfig(max_length=200), cache_dir=tmp_path)
    tokenize_split(examples, gpt2, llama, cfg, aligner=EqualTextAligner(llama, gpt2), cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_aligner_fingerprint_changes_with_its_tokenizers_and_options(gpt2, llama):
    changed = copy.deepcopy(llama)
    changed.add_tokens(["<new-piece>"])
    assert aligner_fingerprint(EqualTextAligner(llama, gpt2)) == aligner_fingerprint(
        EqualTextAligner(copy.deepcopy(llama), gpt2)
    )
    assert aligner_fingerprint(EqualTextAligner(llama, gpt2)) != aligner_fingerprint(EqualTextAligner(changed, gpt2))
    a, b = ShiftedAligner(), ShiftedAligner()
    b.map = np.arange(5)
    assert aligner_fingerprint(a) != aligner_fingerprint(b)
    b.fingerprint = "v7"
    assert aligner_fingerprint(b) == "v7"


def test_aligner_fingerprint_sees_arrays_nested_in_its_fields():
    @dataclasses.dataclass
    class Table:
        flat: np.ndarray

    a, b = ShiftedAligner(), ShiftedAligner()
    a.tables = [Table(np.arange(5000))]
    b.tables = [Table(np.arange(5000))]
    assert aligner_fingerprint(a) == aligner_fingerprint(b)
    b.tables[0].flat[2500] = -1  # hidden by repr's "..." but not by the fingerprint
    assert aligner_fingerprint(a) != aligner_fingerprint(b)


@pytest.mark.integration
def test_errors_raised_in_workers_reach_the_caller_as_data_errors(gpt2, llama, examples):
    with pytest.raises(DataError, match="exceed data.max_length = 20"):
        tokenize_split(examples, gpt2, llama, DataConfig(max_length=20, max_prompt_length=19), num_workers=2)


def test_aligner_breaking_its_contract_is_reported(gpt2, llama, examples):
    with pytest.raises(PluginError, match="ShiftedAligner returned pairs that are out of range"):
        tokenize_split(examples, gpt2, llama, DataConfig(), aligner=ShiftedAligner())


def test_sample_too_long_for_one_tokenizer_is_reported_from_the_split(gpt2, llama):
    samples = [Example("Q:\n", ("7",)), Example("Q:\n", ("😀😀😀",))]  # byte fallback: 12 pieces for Llama
    roomy = DataConfig(max_prompt_length=2)
    n_gpt2 = len(encode_example(gpt2, samples[1].prompt, samples[1].response, roomy)[0])
    n_llama = len(encode_example(llama, samples[1].prompt, samples[1].response, roomy)[0])
    assert n_llama > n_gpt2
    cfg = DataConfig(max_length=n_gpt2, max_prompt_length=2)
    tokenize_split(samples, gpt2, None, cfg, split="valid")  # fits the student's tokenizer
    with pytest.raises(
        DataError,
        match=rf"data.valid, sample 1: {n_llama} tokens with '.*tinyllama' exceed data.max_length = {n_gpt2}",
    ):
        tokenize_split(samples, gpt2, llama, cfg, split="valid")


def test_empty_example_list_is_reported(gpt2):
    with pytest.raises(DataError, match="data.train: split is empty"):
        tokenize_split([], gpt2, None, DataConfig())
