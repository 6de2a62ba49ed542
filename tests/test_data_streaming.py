"""`data.streaming`: the same batches as in memory (ids, labels, alignment) for the same order, in the main
process and in worker processes; the position after any consumed batch, resumed without converting the rows
before it again; disjoint parts for data-parallel ranks; the early end; positions of another stream refused."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import dskd
from dskd.config import DataConfig
from dskd.data.batching import ResumableBatchSampler, collate
from dskd.data.examples import load_examples, tokenize_split
from dskd.data.streaming import StreamBatches, StreamSpec
from dskd.errors import CheckpointError, DataError, DataExhausted

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TASKS = EXAMPLES / "data" / "tasks" / "train.jsonl"
BATCH = 4
CFG = DataConfig(max_length=256, max_prompt_length=192)


@pytest.fixture(scope="module")
def tokenizers():
    student = AutoTokenizer.from_pretrained(EXAMPLES / "tokenizers" / "tinyllama")
    teacher = AutoTokenizer.from_pretrained(EXAMPLES / "tokenizers" / "gpt2")
    for tokenizer in (student, teacher):
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return student, teacher


@pytest.fixture(scope="module")
def aligner(tokenizers):
    student, teacher = tokenizers
    return dskd.load_registry().get("aligners", "eta")(teacher, student)


@pytest.fixture
def corpus(tmp_path) -> Path:
    """30 task records (7 full batches of 4 and a short one), as JSONL."""
    lines = TASKS.read_text(encoding="utf-8").splitlines()[:30]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def collate_for(student, teacher):
    return functools.partial(collate, student_pad_id=student.pad_token_id, teacher_pad_id=teacher.pad_token_id)


def stream(path, tokenizers, aligner, *, consumed=0, workers=0, rank=0, world_size=1, batch=BATCH, cfg=CFG):
    student, teacher = tokenizers
    spec = StreamSpec(str(path), cfg, "train", batch, rank, world_size)
    return StreamBatches(
        spec, student, teacher, aligner, collate_for(student, teacher), consumed=consumed, num_workers=workers
    )


def in_memory_batches(path, tokenizers, aligner) -> list:
    """The in-memory path in file order: load, tokenize_split, the batch sampler without shuffling, collate."""
    student, teacher = tokenizers
    dataset = tokenize_split(load_examples(path, CFG, "train"), student, teacher, CFG, aligner=aligner)
    sampler = ResumableBatchSampler(len(dataset), BATCH, shuffle=False, infinite=False)
    gather = collate_for(student, teacher)
    return [gather([dataset[i] for i in indices]) for indices in sampler]


def assert_same_batch(a, b) -> None:
    for name in (
        "student_input_ids",
        "student_attention_mask",
        "student_labels",
        "teacher_input_ids",
        "teacher_attention_mask",
        "teacher_labels",
        "alignment",
        "aligned_rows",
        "student_rows",
        "teacher_rows",
        "sample_ids",
    ):
        x, y = getattr(a, name), getattr(b, name)
        assert x is not None and torch.equal(x, y), name


def take(batches, n: int) -> list:
    return [next(batches) for _ in range(n)]


def test_a_stream_gives_the_in_memory_batches_for_the_same_order(corpus, tokenizers, aligner):
    expected = in_memory_batches(corpus, tokenizers, aligner)
    assert len(expected) == 7
    batches = stream(corpus, tokenizers, aligner)
    got = take(batches, 7)
    for a, b in zip(got, expected):
        assert_same_batch(a, b)
    assert got[0].alignment.shape[0] > 0  # the tokenizers differ: pairs were made on the fly
    with pytest.raises(DataExhausted):  # the short eighth batch ends the stream, as drop_last does in memory
        next(batches)


@pytest.mark.integration
def test_worker_processes_give_the_same_batches_in_the_same_order(corpus, tokenizers, aligner):
    expected = take(stream(corpus, tokenizers, aligner), 7)
    batches = stream(corpus, tokenizers, aligner, workers=2)  # 7 batches: one worker ends before the other
    for a, b in zip(take(batches, 7), expected):
        assert_same_batch(a, b)
    with pytest.raises(DataExhausted):
        next(batches)


def test_resume_continues_at_the_consumed_position_without_converting_the_rows_before_it(
    corpus, tokenizers, aligner, tmp_path
):
    first = stream(corpus, tokenizers, aligner)
    straight = take(first, 6)  # the engine runs ahead of what it consumed: 6 taken, 3 consumed
    position = first.state_dict(3)
    assert position["batches"] == 3 and position["kind"] == "stream"
    # The resumed stream reads a copy whose first 12 records are broken: converting them again would fail.
    rows = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines()]
    for row in rows[: 3 * BATCH]:
        row["instruction"] = None
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(DataError, match="sample 0: field 'instruction' is missing"):
        next(stream(corpus, tokenizers, aligner))  # the broken rows do fail when read
    resumed = stream(corpus, tokenizers, aligner, consumed=3)
    resumed.load_state_dict(position)
    for a, b in zip(take(resumed, 3), straight[3:]):
        assert_same_batch(a, b)
    assert resumed.state_dict(6)["position"] == first.state_dict(6)["position"]


@pytest.mark.parametrize("fmt", ["parquet", "disk"])
def test_resume_lands_on_the_same_batch_for_columnar_sources(corpus, tokenizers, aligner, tmp_path, fmt):
    from datasets import Dataset

    table = Dataset.from_json(str(corpus))
    source = tmp_path / ("d.parquet" if fmt == "parquet" else "saved")
    table.to_parquet(str(source)) if fmt == "parquet" else table.save_to_disk(str(source))
    first = stream(source, tokenizers, aligner)
    straight = take(first, 5)
    resumed = stream(source, tokenizers, aligner, consumed=2)
    resumed.load_state_dict(first.state_dict(2))
    for a, b in zip(take(resumed, 3), straight[2:]):
        assert_same_batch(a, b)


def test_data_parallel_ranks_read_disjoint_parts_of_the_stream(corpus, tokenizers, aligner):
    seen = []
    for rank in (0, 1):
        batches = stream(corpus, tokenizers, aligner, rank=rank, world_size=2, batch=3)
        texts = []
        for batch in take(batches, 5):  # 15 of the 30 records per rank, in 5 batches of 3
            texts += [tuple(ids) for ids in batch.student_input_ids.tolist()]
        with pytest.raises(DataExhausted, match="this process's part of 2"):
            next(batches)
        seen.append(texts)
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0]) == len(seen[1]) == 15


def test_a_stream_that_ends_names_the_source_and_how_far_it_got(corpus, tokenizers, aligner):
    batches = stream(corpus, tokenizers, aligner, batch=10)
    take(batches, 3)
    with pytest.raises(DataExhausted) as excinfo:
        next(batches)
    message = str(excinfo.value)
    assert "\n" not in message and str(corpus) in message and "ended after 3 batches of 10 (30 samples)" in message
    with pytest.raises(DataExhausted):  # and stays ended
        next(batches)


def test_a_position_of_another_stream_or_none_at_all_is_refused(corpus, tokenizers, aligner):
    first = stream(corpus, tokenizers, aligner)
    take(first, 2)
    position = first.state_dict(2)
    other_batch = stream(corpus, tokenizers, aligner, consumed=2, batch=2)
    with pytest.raises(CheckpointError, match="batch_size = 4, this run has 2"):
        other_batch.load_state_dict(position)
    with pytest.raises(CheckpointError, match="no stream position"):
        stream(corpus, tokenizers, aligner, consumed=2).load_state_dict({"batches_consumed": 2})
    with pytest.raises(CheckpointError, match="holds no stream position"):
        next(stream(corpus, tokenizers, aligner, consumed=2))  # resumed from a count alone


def test_a_missing_field_in_a_stream_is_one_line_naming_the_source(tmp_path, tokenizers, aligner):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "response": "r"}) + "\n" for i in range(8)))
    with pytest.raises(DataError) as excinfo:
        next(stream(path, tokenizers, aligner))
    message = str(excinfo.value)
    assert "\n" not in message and "no field 'instruction'" in message and str(path) in message


def test_a_field_of_mixed_json_types_is_refused_in_one_line_rather_than_read_as_json_text(tmp_path, tokenizers):
    # datasets types such a field Json and gives back '"hello"' (quoted) and '5' for the string "5".
    rows = [{"instruction": "a", "response": ["x", "y"]}] + [
        {"instruction": "a", "response": t} for t in "5 hello w".split()
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as excinfo:
        next(stream(path, tokenizers, None))
    message = str(excinfo.value)
    assert "\n" not in message and "samples 0-3" in message and "field 'response'" in message
    assert "data.streaming = false" in message
