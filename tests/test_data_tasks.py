"""The bundled instruction data (`examples/make_tasks.py`) and the default job's tiny model configs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from dskd.config import DataConfig
from dskd.data.examples import load_examples, tokenize_split

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TASKS = EXAMPLES / "data" / "tasks"
SPLITS = {"train": 4000, "valid": 200, "test": 200}


def read(split: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def test_committed_task_files_are_byte_identical_to_a_fresh_generation(tmp_path):
    subprocess.run(
        [sys.executable, str(EXAMPLES / "make_tasks.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for split in SPLITS:
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (TASKS / f"{split}.jsonl").read_bytes(), split


def test_task_splits_have_the_planned_sizes_dolly_fields_and_every_family():
    for split, size in SPLITS.items():
        records = read(split)
        assert len(records) == size
        for r in records:
            assert set(r) == {"instruction", "context", "response", "category"}
            assert all(isinstance(v, str) for v in r.values()) and r["instruction"] and r["response"]
    families = {r["category"].split("/")[0] for r in read("train")}
    assert families == {"arithmetic", "list", "string", "conversion"}
    tasks = {r["category"] for r in read("train")}
    assert len(tasks) == 15
    assert any(r["context"] for r in read("train")) and any(not r["context"] for r in read("train"))


def test_task_splits_are_disjoint_by_prompt_content():
    keys = {split: {(r["instruction"], r["context"]) for r in read(split)} for split in SPLITS}
    assert all(len(keys[s]) == SPLITS[s] for s in SPLITS)  # no duplicates inside a split either
    assert not keys["train"] & keys["valid"]
    assert not keys["train"] & keys["test"]
    assert not keys["valid"] & keys["test"]


@pytest.mark.parametrize("name", ["gpt2", "tinyllama", "mistral"])
def test_task_responses_are_one_to_twelve_tokens_and_answers_are_correct(name):
    tokenizer = AutoTokenizer.from_pretrained(EXAMPLES / "tokenizers" / name)
    cfg = DataConfig()
    for split in SPLITS:
        rows = tokenize_split(load_examples(TASKS / f"{split}.jsonl", cfg, split), tokenizer, None, cfg, split=split)
        for row in rows:
            assert 1 <= len(row["student_ids"]) - row["student_prompt_len"] - 1 <= 12, (
                split,
                row["sample_id"],
            )
    # Spot-check the answers against an independent computation of each task.
    for r in read("valid"):
        task, ctx, resp = r["category"], r["context"], r["response"]
        if task == "list/sort":
            assert resp.split() == sorted(ctx.split(), key=int)
        elif task == "list/max":
            assert int(resp) == max(map(int, ctx.split()))
        elif task == "arithmetic/add" and ctx:
            a, b = map(int, ctx.split(" and "))
            assert int(resp) == a + b
        elif task == "string/reverse":
            assert resp == ctx[::-1]


@pytest.mark.parametrize(
    "folder, arch, sizes",
    [
        (
            "teacher-llama",
            "LlamaForCausalLM",
            {
                "vocab_size": 32000,
                "hidden_size": 256,
                "num_hidden_layers": 4,
                "num_attention_heads": 4,
                "intermediate_size": 688,
                "max_position_embeddings": 512,
                "bos_token_id": 1,
                "eos_token_id": 2,
            },
        ),
        (
            "student-llama",
            "LlamaForCausalLM",
            {
                "vocab_size": 32000,
                "hidden_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "intermediate_size": 344,
                "bos_token_id": 1,
                "eos_token_id": 2,
            },
        ),
        (
            "student-gpt2",
            "GPT2LMHeadModel",
            {
                "vocab_size": 50257,
                "n_embd": 128,
                "n_layer": 2,
                "n_head": 4,
                "n_positions": 512,
                "eos_token_id": 50256,
            },
        ),
    ],
)
def test_example_model_configs_build_tied_random_models_of_the_stated_sizes(folder, arch, sizes):
    config = AutoConfig.from_pretrained(EXAMPLES / "models" / folder)
    for key, value in sizes.items():
        assert getattr(config, key) == value, key
    assert config.tie_word_embeddings is True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == arch
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 2]])).logits
    assert logits.shape == (1, 4, sizes["vocab_size"]) and torch.isfinite(logits).all()
