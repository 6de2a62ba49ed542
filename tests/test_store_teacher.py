"""A teacher store answers like the live teacher it was built from: bit for bit where the stored dtype is the
teacher's, within the stated rounding where it is not (int8, float16 top-k); and it refuses what it cannot answer."""

from __future__ import annotations

import shutil

import pytest
import torch
from store_jobs import REGISTRY, build, live_batches

from dskd.config import load_config
from dskd.errors import StoreError
from dskd.models.teacher import topk_with_tail
from dskd.store.build import BuildOptions, build_store
from dskd.store.inspect import verify_store
from dskd.store.layout import MANIFEST, shard_path
from dskd.store.teacher import StoreTeacher
from dskd.types import SignalRequest

BF16 = ["teacher.dtype=bfloat16"]
ORDERS = [[0, 1, 2, 3], [7, 2, 9], [11, 0, 5, 3, 8, 1]]  # other compositions and orders than the build's batches


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    path, hidden = build(root / "bf16", BF16)
    _, int8 = build(root / "int8", BF16, dtype="int8")
    _, topk = build(root / "topk", BF16, mode="topk", k=8)
    teacher, batches = live_batches(path, BF16, ORDERS)
    opened = {name: StoreTeacher(folder) for name, folder in (("hidden", hidden), ("int8", int8), ("topk", topk))}
    yield {
        "job": path,
        "hidden": hidden,
        "int8": int8,
        "topk": topk,
        "live": teacher,
        "batches": batches,
        "open": opened,
    }
    for store in opened.values():
        store.close()


def _args(batch, request):
    return batch.teacher_input_ids, batch.teacher_attention_mask, batch.teacher_rows, request


def test_a_bf16_store_returns_the_bf16_teachers_hidden_states_bit_for_bit_in_any_batch(stores):
    store = stores["open"]["hidden"]
    request = SignalRequest(hidden_states=True)
    assert store.fingerprint == stores["live"].fingerprint
    for batch in stores["batches"]:
        mine, live = store.score(*_args(batch, request)), stores["live"].score(*_args(batch, request))
        assert mine.hidden_states.dtype == live.hidden_states.dtype == torch.bfloat16
        assert torch.equal(mine.hidden_states, live.hidden_states)
        assert torch.equal(mine.rows_per_sequence, live.rows_per_sequence)
    # the stored head is the teacher's, so every distribution computed from these states is the live one
    assert torch.equal(store.head.weight, stores["live"].head.weight)
    assert torch.equal(store.embeddings, stores["live"].embeddings)


def test_a_hidden_store_answers_top_k_and_logits_requests_as_the_live_teacher_does(stores):
    store = stores["open"]["hidden"]
    request = SignalRequest(top_k=5, logits=True)
    for batch in stores["batches"]:
        mine, live = store.score(*_args(batch, request)), stores["live"].score(*_args(batch, request))
        assert torch.equal(mine.logits, live.logits)
        assert torch.equal(mine.topk_ids, live.topk_ids)
        assert torch.equal(mine.topk_logprobs, live.topk_logprobs)
        assert torch.equal(mine.tail_logmass, live.tail_logmass)


def test_an_int8_store_is_within_half_a_quantisation_step_of_every_hidden_value(stores):
    store = stores["open"]["int8"]
    request = SignalRequest(hidden_states=True)
    for batch in stores["batches"]:
        mine = store.score(*_args(batch, request)).hidden_states
        live = stores["live"].score(*_args(batch, request)).hidden_states.float()
        step = live.abs().amax(dim=1, keepdim=True) / 127  # the scale each row was stored with
        assert torch.all((mine - live).abs() <= step / 2 + 1e-6 * live.abs().amax())


def test_a_topk_store_keeps_the_live_top_k_and_narrows_it_exactly(stores):
    store = stores["open"]["topk"]
    for k in (8, 3):
        request = SignalRequest(top_k=k)
        for batch in stores["batches"]:
            mine = store.score(*_args(batch, request))
            # independent reference: the dense distribution of the live teacher, cut at k here
            z = stores["live"].score(*_args(batch, SignalRequest(logits=True))).logits
            _, logprobs, tail = topk_with_tail(z, k)
            # a random bf16 teacher has tied logits, so ids are compared through the live log-probabilities at them
            at_ids = torch.log_softmax(z, dim=-1).gather(1, mine.topk_ids)
            assert torch.allclose(mine.topk_logprobs, at_ids, rtol=2**-10, atol=1e-3)  # float16 storage
            assert torch.allclose(mine.topk_logprobs, logprobs, rtol=2**-10, atol=1e-3)
            assert torch.allclose(mine.tail_logmass, tail, rtol=1e-3, atol=1e-3)


def test_a_topk_store_refuses_requests_it_cannot_answer_with_a_sentence(stores):
    store = stores["open"]["topk"]
    assert "--mode hidden" in store.check_request(SignalRequest(hidden_states=True))
    assert "--k 9" in store.check_request(SignalRequest(top_k=9))
    assert store.check_request(SignalRequest(top_k=8)) == ""
    with pytest.raises(StoreError, match="holds top-8"):
        store.score(*_args(stores["batches"][0], SignalRequest(hidden_states=True)))


def test_score_async_prefetches_the_same_signal(stores):
    store = stores["open"]["hidden"]
    batch = stores["batches"][2]
    future = store.score_async(*_args(batch, SignalRequest(hidden_states=True)))
    assert torch.equal(
        future.result().hidden_states, store.score(*_args(batch, SignalRequest(hidden_states=True))).hidden_states
    )


def test_a_sequence_the_store_does_not_hold_and_a_row_outside_the_label_rows_are_refused(stores):
    store = stores["open"]["hidden"]
    batch = stores["batches"][0]
    ids = batch.teacher_input_ids.clone()
    ids[0, 3] = (ids[0, 3] + 1) % 32000
    with pytest.raises(StoreError, match="not in the teacher store"):
        store.score(ids, batch.teacher_attention_mask, batch.teacher_rows, SignalRequest(hidden_states=True))
    prompt_row = torch.tensor([0])  # position 0 is a prompt position: no label, not stored
    with pytest.raises(StoreError, match="label rows only"):
        store.score(
            batch.teacher_input_ids, batch.teacher_attention_mask, prompt_row, SignalRequest(hidden_states=True)
        )


def test_verify_finds_a_flipped_byte_and_the_store_refuses_to_read_that_shard(stores, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(stores["hidden"], copy)
    assert verify_store(copy) == []
    shard = shard_path(copy, 1)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # one bit of one stored hidden state
    shard.write_bytes(bytes(data))
    problems = verify_store(copy)
    assert problems == [f"shard {shard.name} does not match its sha256 (corrupt)"]
    store = StoreTeacher(copy)  # sizes are fine: the checksum is read when the shard is first opened
    with pytest.raises(StoreError, match="does not match its sha256"):
        store.reader.sample(1, 0)


def test_a_truncated_shard_is_refused_when_the_store_opens(stores, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(stores["hidden"], copy)
    shard = shard_path(copy, 2)
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(StoreError, match="truncated"):
        StoreTeacher(copy)
    assert "truncated" in verify_store(copy)[0]


@pytest.mark.integration
def test_a_finished_store_is_never_overwritten_and_a_partial_one_only_resumed_with_its_own_plan(stores, tmp_path):
    config = load_config(stores["job"], BF16, registry=REGISTRY)
    manifest = (stores["hidden"] / MANIFEST).read_bytes()
    with pytest.raises(StoreError, match="never overwritten"):
        build_store(config, REGISTRY, stores["hidden"], BuildOptions(batch_size=4, shard_samples=5))
    assert (stores["hidden"] / MANIFEST).read_bytes() == manifest
    # worker 0 of 3 leaves a partial build; a build with another shard size or mode must not mix into it
    partial = tmp_path / "partial"
    report = build_store(config, REGISTRY, partial, BuildOptions(batch_size=4, shard_samples=5, workers=3))
    assert not report.finished and report.written == len(range(0, report.shards_total, 3))
    with pytest.raises(StoreError, match="another mode"):
        build_store(
            config, REGISTRY, partial, BuildOptions(mode="topk", batch_size=4, shard_samples=5, worker=1, workers=3)
        )
