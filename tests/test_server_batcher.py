"""The model worker: merged forwards give each request what a forward of its own would, under the budget."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from dskd.kit.lm_head import head_from_model
from dskd.models.teacher import topk_with_tail
from dskd.protos import teacher_pb2 as pb
from dskd.servers.batcher import (
    DeadlineExpiredError,
    ModelWorker,
    QueueFullError,
    ScoreJob,
    shrink_topk,
)
from dskd.servers.validation import ScoreInput
from dskd.servers.wire import Packed, bytes_tensor
from dskd.types import SignalRequest

VOCAB = 96


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def make_worker(model, **kwargs) -> ModelWorker:
    head = head_from_model(model, VOCAB).detached()
    return ModelWorker(model, head, None, **{"max_batch_tokens": 256, **kwargs})


def score_input(sequences, positions, request, wire_dtype=pb.FP32) -> ScoreInput:
    return ScoreInput(
        tokens=Packed(
            np.concatenate([np.asarray(s, np.int64) for s in sequences]),
            np.array([len(s) for s in sequences], np.int64),
        ),
        positions=np.concatenate([np.asarray(p, np.int64) for p in positions]) if positions else np.zeros(0, np.int64),
        counts=np.array([len(p) for p in positions], np.int64),
        request=request,
        wire_dtype=wire_dtype,
    )


def decode(result) -> dict[str, torch.Tensor]:
    return {t.name: bytes_tensor(t.data, t.dtype, t.shape) for t in result.tensors}


@torch.no_grad()
def reference(model, sequence, positions, k):
    """Own unpadded forward of one sequence: logits and hidden states at `positions`, dense top-k and tail."""
    out = model(input_ids=torch.tensor([sequence]), output_hidden_states=True)
    logits = out.logits[0, positions].float()
    logprobs = logits.log_softmax(-1)
    values, ids = logprobs.topk(k, dim=-1)
    tail = torch.log1p(-values.exp().sum(-1).clamp(max=1 - 1e-12))
    return out.hidden_states[-1][0, positions], ids, values, tail, logits


def run_all(worker, inputs):
    """Queue every job before the worker starts, so they are all waiting when it takes the first."""
    jobs = [ScoreJob(input=i) for i in inputs]
    futures = [worker.submit(job) for job in jobs]
    worker.start()
    try:
        return [f.result(timeout=60) for f in futures]
    finally:
        worker.stop()


def test_merged_requests_each_get_their_own_forwards_answer(model):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, VOCAB, n).tolist() for n in (5, 9, 3, 7)]
    inputs = [
        score_input(seqs[:2], [[0, 4], [8, 2, 5]], SignalRequest(hidden_states=True, top_k=6, logits=True)),
        score_input(seqs[2:3], [[0, 1, 2]], SignalRequest(top_k=3)),
        score_input(seqs[3:], [[6]], SignalRequest(hidden_states=True)),
    ]
    results = run_all(make_worker(model), inputs)
    assert [r.batch_requests for r in results] == [3, 3, 3]
    got = decode(results[0])
    hidden, ids, values, tail, logits = zip(*(reference(model, s, p, 6) for s, p in zip(seqs[:2], [[0, 4], [8, 2, 5]])))
    torch.testing.assert_close(got["hidden_states"], torch.cat(hidden), atol=1e-4, rtol=1e-4)
    assert torch.equal(got["topk_ids"].long(), torch.cat(ids))
    torch.testing.assert_close(got["topk_logprobs"], torch.cat(values), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got["tail_logmass"], torch.cat(tail), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got["logits"], torch.cat(logits), atol=1e-4, rtol=1e-4)
    assert results[0].rows_per_sequence == [2, 3]
    # The second request asked for top-3 while the forward computed top-6: cut down, tail folded back.
    got = decode(results[1])
    _, ids, values, tail, _ = reference(model, seqs[2], [0, 1, 2], 3)
    assert set(got) == {"topk_ids", "topk_logprobs", "tail_logmass"}
    assert torch.equal(got["topk_ids"].long(), ids)
    torch.testing.assert_close(got["tail_logmass"], tail, atol=1e-4, rtol=1e-4)
    got = decode(results[2])
    assert set(got) == {"hidden_states"}
    torch.testing.assert_close(got["hidden_states"], reference(model, seqs[3], [6], 1)[0], atol=1e-4, rtol=1e-4)


def test_requests_beyond_the_token_budget_run_in_separate_forwards(model):
    inputs = [score_input([[1] * 8] * 2, [[0], [1]], SignalRequest(top_k=2)) for _ in range(3)]  # 16 padded tokens each
    results = run_all(make_worker(model, max_batch_tokens=32), inputs)
    assert [r.batch_requests for r in results] == [2, 2, 1]
    assert all(r.batch_tokens <= 32 for r in results)


def test_no_batching_runs_one_request_per_forward(model):
    inputs = [score_input([[3, 4, 5]], [[1]], SignalRequest(top_k=2)) for _ in range(3)]
    results = run_all(make_worker(model, batching=False), inputs)
    assert [r.batch_requests for r in results] == [1, 1, 1]


def test_bf16_wire_rounds_only_the_float_outputs(model):
    (result,) = run_all(
        make_worker(model),
        [score_input([[7, 8, 9, 10]], [[0, 3]], SignalRequest(hidden_states=True, top_k=4), wire_dtype=pb.BF16)],
    )
    dtypes = {t.name: t.dtype for t in result.tensors}
    assert dtypes == {"hidden_states": pb.BF16, "topk_ids": pb.INT32, "topk_logprobs": pb.BF16, "tail_logmass": pb.FP32}
    hidden, *_ = reference(model, [7, 8, 9, 10], [0, 3], 4)
    got = decode(result)["hidden_states"].float()
    assert torch.allclose(got, hidden, rtol=2**-8, atol=1e-6)


def test_cancelled_job_is_skipped_and_others_still_run(model):
    worker = make_worker(model)
    cancelled = worker.submit(ScoreJob(input=score_input([[1, 2]], [[0]], SignalRequest(top_k=2))))
    kept = worker.submit(ScoreJob(input=score_input([[1, 2]], [[1]], SignalRequest(top_k=2))))
    assert cancelled.cancel()
    worker.start()
    try:
        assert kept.result(timeout=60).batch_requests == 1
    finally:
        worker.stop()


def test_job_whose_deadline_passed_in_the_queue_is_dropped(model):
    worker = make_worker(model)
    expired = worker.submit(
        ScoreJob(input=score_input([[1, 2]], [[0]], SignalRequest(top_k=2)), deadline=time.monotonic() - 1)
    )
    worker.start()
    try:
        with pytest.raises(DeadlineExpiredError):
            expired.result(timeout=60)
    finally:
        worker.stop()


def test_full_queue_refuses_new_jobs(model):
    worker = make_worker(model, max_queue=1)
    worker.submit(ScoreJob(input=score_input([[1]], [[0]], SignalRequest(top_k=1))))
    with pytest.raises(QueueFullError, match="queue is full"):
        worker.submit(ScoreJob(input=score_input([[1]], [[0]], SignalRequest(top_k=1))))


def test_failed_forward_fails_its_jobs_and_the_worker_keeps_serving(model):
    worker = make_worker(model)
    bad = worker.submit(ScoreJob(input=score_input([[1, 2]], [[5]], SignalRequest(top_k=2))))  # position past the end
    worker.start()
    try:
        with pytest.raises(IndexError):
            bad.result(timeout=60)
        good = worker.submit(ScoreJob(input=score_input([[1, 2]], [[1]], SignalRequest(top_k=2))))
        assert good.result(timeout=60).rows_per_sequence == [1]
    finally:
        worker.stop()


def test_shrink_topk_equals_topk_of_the_full_distribution():
    logits = torch.randn(6, 50) * 3
    big_ids, big_lp, big_tail = topk_with_tail(logits, 12)
    ids, lp, tail = shrink_topk(big_ids, big_lp, big_tail, 5)
    dense = logits.log_softmax(-1)
    ref_lp, ref_ids = dense.topk(5, dim=-1)
    ref_tail = torch.log1p(-ref_lp.exp().sum(-1))
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(tail, ref_tail, atol=1e-5, rtol=1e-5)


def test_shrink_topk_to_the_whole_vocabulary_leaves_no_tail():
    logits = torch.randn(2, 4)
    ids, lp, tail = topk_with_tail(logits, 4)
    assert torch.isneginf(shrink_topk(ids, lp, tail, 4)[2]).all()
