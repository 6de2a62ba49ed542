"""`ResumableBatchSampler` and `make_loader`: a fixed order per (seed, epoch), disjoint rank slices of every
global batch, and a resumed run that sees exactly the batches an uninterrupted one would."""

from __future__ import annotations

import functools
import itertools
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from dskd.config import DataConfig
from dskd.data.batching import ResumableBatchSampler, collate, make_loader
from dskd.data.examples import load_examples, tokenize_split
from dskd.errors import CheckpointError, DataError
from dskd.types import Batch


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_same_seed_gives_the_same_batches_whatever_the_global_rng_did():
    torch.manual_seed(1)
    random.seed(1)
    first = take(ResumableBatchSampler(50, 4, seed=3), 40)
    torch.manual_seed(2)
    torch.rand(100)
    random.seed(2)
    second = take(ResumableBatchSampler(50, 4, seed=3), 40)
    assert first == second
    assert take(ResumableBatchSampler(50, 4, seed=4), 40) != first


def test_every_epoch_is_a_new_permutation_and_drop_last_skips_the_short_batch():
    sampler = ResumableBatchSampler(50, 4, seed=0)  # drop_last: 12 batches of 4, 2 samples left out per epoch
    assert len(sampler) == 12
    epochs = [sampler.epoch_batches(e) for e in range(3)]
    for batches in epochs:
        flat = [i for b in batches for i in b]
        assert all(len(b) == 4 for b in batches) and len(set(flat)) == 48 and set(flat) <= set(range(50))
    assert epochs[0] != epochs[1] != epochs[2]
    assert take(sampler, 36) == epochs[0] + epochs[1] + epochs[2]  # endless: epochs follow one another


def test_without_drop_last_one_process_sees_every_sample_once_per_epoch():
    sampler = ResumableBatchSampler(10, 4, seed=0, drop_last=False)
    batches = sampler.epoch_batches(0)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(i for b in batches for i in b) == list(range(10))
    ordered = ResumableBatchSampler(10, 4, shuffle=False, drop_last=False, infinite=False)
    assert list(ordered) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_get_disjoint_slices_of_each_global_batch(drop_last):
    world, size, n = 3, 4, 50
    ranks = [
        ResumableBatchSampler(n, size, seed=5, rank=r, world_size=world, drop_last=drop_last) for r in range(world)
    ]
    single = ResumableBatchSampler(n, size * world, seed=5, drop_last=drop_last)  # one process, same global batches
    assert len({len(s) for s in ranks}) == 1
    global_batches = single.epoch_batches(0)
    for k in range(len(ranks[0])):
        slices = [s.epoch_batches(0)[k] for s in ranks]
        assert all(len(piece) == size for piece in slices)  # equal sizes on every rank, even the last batch
        joined = [i for piece in slices for i in piece]
        if len(global_batches[k]) == size * world:
            assert joined == global_batches[k] and len(set(joined)) == size * world
        else:  # the short last global batch is topped up from the start of the epoch's order
            assert joined[: len(global_batches[k])] == global_batches[k]
            assert joined[len(global_batches[k]) :] == global_batches[0][: size * world - len(global_batches[k])]
    if not drop_last:
        covered = {i for s in ranks for b in s.epoch_batches(0) for i in b}
        assert covered == set(range(n))


@pytest.mark.parametrize("consumed", [0, 5, 12, 13, 30])
def test_resume_from_state_continues_with_the_next_batch_across_epochs(consumed):
    reference = take(ResumableBatchSampler(50, 4, seed=9, rank=1, world_size=2), consumed + 8)
    original = ResumableBatchSampler(50, 4, seed=9, rank=1, world_size=2)
    take(original, consumed + 3)  # the loader ran ahead of what the engine consumed
    state = original.state_dict(consumed)
    assert (state["epoch"], state["batch_in_epoch"]) == divmod(consumed, len(original))
    resumed = ResumableBatchSampler(50, 4, seed=9, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert take(resumed, 8) == reference[consumed:]
    assert (
        take(ResumableBatchSampler(50, 4, seed=9, rank=1, world_size=2, start_batch=consumed), 8)
        == reference[consumed:]
    )


def rows(n):
    return [
        {
            "sample_id": i,
            "student_ids": [5] * (2 + i % 4) + [9],
            "student_prompt_len": 1,
            "teacher_ids": [1] + [6] * (1 + i % 3) + [2],
            "teacher_prompt_len": 1,
        }
        for i in range(n)
    ]


def test_loader_with_prefetching_workers_resumes_at_the_consumed_batch():
    data = rows(23)
    collate_fn = functools.partial(collate, student_pad_id=0, teacher_pad_id=0)
    uninterrupted = list(itertools.islice(make_loader(data, ResumableBatchSampler(23, 3, seed=1), collate_fn, 0), 14))
    assert all(isinstance(b, Batch) for b in uninterrupted)
    sampler = ResumableBatchSampler(23, 3, seed=1)
    loader = iter(make_loader(data, sampler, collate_fn, num_workers=2))
    consumed = [next(loader) for _ in range(9)]  # two workers have prefetched further than this
    state = sampler.state_dict(len(consumed))
    del loader
    resumed_sampler = ResumableBatchSampler(23, 3, seed=1)
    resumed_sampler.load_state_dict(state)
    resumed = list(itertools.islice(make_loader(data, resumed_sampler, collate_fn, num_workers=2), 5))
    for got, want in zip(consumed + resumed, uninterrupted):
        assert torch.equal(got.sample_ids, want.sample_ids)
        assert torch.equal(got.student_input_ids, want.student_input_ids) and torch.equal(
            got.teacher_labels, want.teacher_labels
        )


@pytest.mark.parametrize("key, value", [("seed", 1), ("world_size", 2), ("batch_size", 5), ("num_samples", 49)])
def test_state_from_a_different_setup_is_refused(key, value):
    settings = {"num_samples": 50, "batch_size": 4, "seed": 0, "world_size": 1}
    state = ResumableBatchSampler(settings["num_samples"], settings["batch_size"], seed=settings["seed"]).state_dict(3)
    settings[key] = value
    other = ResumableBatchSampler(
        settings["num_samples"],
        settings["batch_size"],
        seed=settings["seed"],
        world_size=settings["world_size"],
    )
    with pytest.raises(CheckpointError, match=f"made with {key} = "):
        other.load_state_dict(state)


def test_split_smaller_than_one_global_batch_is_reported():
    with pytest.raises(DataError, match="5 samples, fewer than one global batch of 8.*lower train.batch_size"):
        ResumableBatchSampler(5, 4, world_size=2, rank=0)
    assert len(ResumableBatchSampler(5, 4, world_size=2, drop_last=False)) == 1


def test_rank_outside_the_world_is_reported():
    with pytest.raises(DataError, match="rank 2 is outside"):
        ResumableBatchSampler(50, 4, rank=2, world_size=2)


def test_loader_over_a_tokenized_split_collates_the_sampled_rows_in_workers():
    examples_dir = Path(__file__).resolve().parents[1] / "examples"
    tok = AutoTokenizer.from_pretrained(examples_dir / "tokenizers" / "gpt2")
    examples = load_examples(examples_dir / "data" / "tasks" / "valid.jsonl", DataConfig(), "valid")[:20]
    dataset = tokenize_split(examples, tok, None, DataConfig(), split="valid")
    collate_fn = functools.partial(collate, student_pad_id=tok.eos_token_id, teacher_pad_id=tok.eos_token_id)
    sampler = ResumableBatchSampler(len(dataset), 4, seed=2)
    batches = list(itertools.islice(make_loader(dataset, sampler, collate_fn, num_workers=2), 7))
    for got, indices in zip(batches, take(sampler, 7)):
        want = collate([dataset[i] for i in indices], student_pad_id=tok.eos_token_id, teacher_pad_id=tok.eos_token_id)
        assert got.sample_ids.tolist() == indices
        assert torch.equal(got.student_input_ids, want.student_input_ids) and torch.equal(
            got.student_labels, want.student_labels
        )
