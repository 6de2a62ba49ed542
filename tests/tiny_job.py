"""A tiny but real job for engine and CLI tests: 1-layer Llama models on the real TinyLlama tokenizer and a
slice of the bundled task data, written into a temporary folder."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZERS = ROOT / "examples" / "tokenizers"
TASKS = ROOT / "examples" / "data" / "tasks"


def llama_config(hidden: int, layers: int = 1, vocab: int = 32000) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def write_job(
    tmp: Path, *, samples: int = 48, objective: str = "dskd_v2", extra: str = "", stages=("distill",), steps: int = 4
) -> Path:
    """Write models, data and a TOML job under `tmp`; return the TOML path."""
    (tmp / "teacher").mkdir(parents=True, exist_ok=True)
    (tmp / "student").mkdir(exist_ok=True)
    (tmp / "teacher" / "config.json").write_text(json.dumps(llama_config(24)))
    (tmp / "student" / "config.json").write_text(json.dumps(llama_config(16)))
    for split, n in (("train", samples), ("valid", 16), ("test", 8)):
        lines = (TASKS / f"{split}.jsonl").read_text().splitlines()[:n]
        (tmp / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    toml = f"""
[run]
output_dir = "run"
seed = 3
stages = {json.dumps(list(stages))}
log_every = 1

[teacher]
config = "teacher"
tokenizer = "{TOKENIZERS / "tinyllama"}"

[student]
config = "student"
tokenizer = "{TOKENIZERS / "tinyllama"}"

[data]
train = "train.jsonl"
valid = "valid.jsonl"
test = "test.jsonl"
max_length = 128
max_prompt_length = 96

[train]
max_steps = {steps}
batch_size = 4
lr = 1e-3
warmup_steps = 1
chunk_size = 7

[objective]
name = "{objective}"
temperature = 2.0

[eval]
max_new_tokens = 4
batch_size = 8
max_samples = 4
{extra}
"""
    path = tmp / "job.toml"
    path.write_text(toml)
    return path
