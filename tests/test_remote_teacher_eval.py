"""The eval stage measures a remote teacher's generation metrics too, equal to those of the same teacher in
process (issue 11, item 10), and a server warms up with a small batch, not the whole token budget."""

from __future__ import annotations

import pytest
from teacher_server_harness import save_tiny_teacher, start_servers, stop_servers
from tiny_job import write_job

from dskd.config import load_config
from dskd.evaluation.stage import evaluate_stage
from dskd.registry import load_registry
from dskd.run.job import Job

REGISTRY = load_registry()


def _teacher_metrics(tmp, overrides) -> dict:
    path = write_job(tmp, stages=("eval",), extra="")
    job = Job(load_config(path, overrides, registry=REGISTRY), REGISTRY)
    job.prepare_run_dir()
    return evaluate_stage(job, None, None, include=("teacher",))


@pytest.mark.integration
def test_a_remote_teacher_gets_the_generation_metrics_of_the_same_teacher_in_process(tmp_path):
    teacher_dir = save_tiny_teacher(tmp_path / "teacher", hidden_size=32, layers=1)
    local = _teacher_metrics(tmp_path / "local", [f"teacher.model={teacher_dir}", "eval.max_new_tokens=6"])
    [server] = start_servers([(teacher_dir, (), "teacher")], tmp_path / "servers")
    try:
        remote = _teacher_metrics(
            tmp_path / "remote",
            [
                f'teacher.address=["{server.address}"]',
                'teacher.config=""',
                f"teacher.cache_dir={tmp_path / 'cache'}",
                "eval.max_new_tokens=6",
            ],
        )
    finally:
        stop_servers([server])
    assert "teacher" in remote, remote
    assert remote["teacher"]["num_examples"] == local["teacher"]["num_examples"] == 4
    # Greedy decoding of the same float32 weights: the same answers, so the same figures.
    for key in ("exact_match", "rougeL", "avg_new_tokens"):
        assert remote["teacher"][key] == pytest.approx(local["teacher"][key]), key


def test_the_server_warm_up_runs_the_lm_head_on_one_chunk_of_rows_only():
    """At a 151k vocabulary a top-k over every row of the token budget took 40-75 s on CPU; one chunk of rows
    already takes the head's peak memory (serving runs it chunk by chunk), the body still sees the full budget."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dskd.kit.lm_head import head_from_model
    from dskd.servers.batcher import ModelWorker

    config = LlamaConfig(
        vocab_size=96,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    head = head_from_model(model, 96).detached()
    head_rows, body_tokens = [], []
    logits = head.logits
    head.logits = lambda hidden: (head_rows.append(hidden.shape[0]), logits(hidden))[1]
    model.register_forward_hook(
        lambda module, args, kwargs, out: body_tokens.append(kwargs["input_ids"].numel()), with_kwargs=True
    )
    worker = ModelWorker(model, head, None, max_batch_tokens=2048, chunk_rows=128)
    worker.warm_up(2048, 256)
    assert sum(head_rows) <= 128, head_rows
    assert sum(body_tokens) == 2048, body_tokens
