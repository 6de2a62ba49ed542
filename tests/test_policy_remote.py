"""Policies with a teacher server on loopback: on-policy samples scored remotely on one vocabulary and across
two, and sequence-level KD on samples from the server's `Generate`."""

from __future__ import annotations

import json
import math

import pytest
from policy_setup import make_job, metrics, text_bytes, write_policy_job
from teacher_server_harness import save_tiny_teacher, start_servers, stop_servers

from dskd.data.examples import load_examples
from dskd.kit.rollout import generation_seed
from dskd.models.teacher import LocalTeacher

pytestmark = pytest.mark.integration
SAMPLING = {"max_new_tokens": 6}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    teacher_dir = save_tiny_teacher(root / "teacher", hidden_size=32, layers=1)
    [process] = start_servers([(teacher_dir, (), "teacher")], root / "servers")
    yield process, teacher_dir, root
    stop_servers([process])


def remote_run(tmp_path, server, *, vocab: str, policy: str, objective: str = "dskd_v2") -> list[dict]:
    process, _, root = server
    path = write_policy_job(tmp_path, vocab=vocab, objective=objective, policy=policy, options=SAMPLING)
    job = make_job(
        path,
        [f'teacher.address=["{process.address}"]', 'teacher.config=""', f"teacher.cache_dir={root / 'head-cache'}"],
    )
    job.distill(None)
    return metrics(tmp_path / "run")


def assert_trained(lines: list[dict], label: str) -> None:
    assert [line["step"] for line in lines] == [1, 2]
    for line in lines:
        assert all(math.isfinite(v) for k, v in line.items() if k.startswith("train/")), line
        assert line.get(f"policy/{label}") == 1, line
        assert line["teacher/calls"] > 0


@pytest.mark.parametrize("vocab", ["same", "different"])
def test_on_policy_samples_are_scored_by_a_teacher_server(tmp_path, server, vocab):
    # "different": a GPT-2 student against the server's TinyLlama teacher, re-tokenised and aligned per batch.
    lines = remote_run(tmp_path, server, vocab=vocab, policy="on_policy")
    assert_trained(lines, "on_policy:sampled")
    if vocab == "different":
        assert all(line["train/align_ratio"] > 0 for line in lines)


def test_teacher_generated_samples_come_from_the_servers_generate(tmp_path, server):
    lines = remote_run(tmp_path, server, vocab="same", policy="teacher_generated", objective="kd")
    assert_trained(lines, "teacher_generated")
    [cache] = (tmp_path / "run" / "cache").glob("teacher-samples-*.jsonl")
    records = [json.loads(line) for line in cache.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 8  # two steps of 4 distinct samples
    # The same weights in process, asked with the same prompts and seed, sample the same texts: what the
    # server returned is the teacher's own sampling, not something made up on the client.
    _, teacher_dir, _ = server
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = LocalTeacher(AutoModelForCausalLM.from_pretrained(teacher_dir), AutoTokenizer.from_pretrained(teacher_dir))
    first = records[:4]
    prompts = _teacher_prompts(tmp_path, local, [r["sample_id"] for r in first])
    samples = local.generate(
        prompts,
        max_new_tokens=SAMPLING["max_new_tokens"],
        temperature=1.0,
        top_p=1.0,
        seed=generation_seed(3, 0, first[0]["sample_id"]),
    )
    eos = local.tokenizer.eos_token_id
    assert [r["ended"] for r in first] == [bool(s) and s[-1] == eos for s in samples]
    texts = [text_bytes("tinyllama", [i for i in s if i != eos]).decode("utf-8", errors="replace") for s in samples]
    assert [r["text"] for r in first] == texts


def _teacher_prompts(tmp_path, teacher, sample_ids) -> list[list[int]]:
    from dskd.config import DataConfig
    from dskd.data.examples import encode_prompt

    cfg = DataConfig(max_length=128, max_prompt_length=96)
    examples = load_examples(tmp_path / "train.jsonl", cfg, "train")
    return [encode_prompt(teacher.tokenizer, examples[i].prompt, cfg) for i in sample_ids]
