"""What the policy tests build: policies in process over real tokenizers and tiny models, and tiny real jobs.

In process: a `PolicyContext` over a pair of real tokenizers (student, teacher) with tiny random models, and
the data loader's batch of `cross_vocab_models.EXAMPLES` for it. Pairs: one shared vocabulary
(TinyLlama/TinyLlama), the default job's pair (GPT-2 student, Mistral teacher), and a SentencePiece student with
a byte-level teacher (TinyLlama student, GPT-2 teacher).

Jobs: same vocabulary is `tiny_job.write_job` (1-layer Llamas over the TinyLlama tokenizer); different
vocabularies, a 1-layer Llama teacher over the Mistral tokenizer and a 1-layer GPT-2 student over the GPT-2
tokenizer. Either way a slice of the bundled task data, `max_new_tokens` small, each run a few seconds on a CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

from cross_vocab_models import EXAMPLES, tiny_gpt2, tiny_llama
from tiny_job import TOKENIZERS, llama_config, write_job
from transformers import AutoTokenizer

from dskd.config import DataConfig, load_config
from dskd.data.batching import collate
from dskd.data.examples import tokenize_split
from dskd.kit.objective import same_vocabulary
from dskd.kit.policy import PolicyContext
from dskd.kit.token_bytes import vocab_bytes
from dskd.models.loading import ensure_pad_token
from dskd.models.teacher import LocalTeacher
from dskd.plugins.aligners.eta import eta
from dskd.registry import load_registry
from dskd.run.job import Job
from dskd.types import Batch

REGISTRY = load_registry()
PAIRS = {
    "same": ("tinyllama", "tinyllama"),
    "different": ("gpt2", "mistral"),
    "sentencepiece_student": ("tinyllama", "gpt2"),
}
CFG = DataConfig()
PROMPTS = tuple(e.prompt for e in EXAMPLES)


@functools.cache
def tokenizer(name: str):
    """A private copy with a pad token, as `dskd.models.loading.load_tokenizer` gives (GPT-2 has none)."""
    return ensure_pad_token(AutoTokenizer.from_pretrained(TOKENIZERS / name))


@functools.cache
def token_bytes(name: str):
    return vocab_bytes(tokenizer(name)).table


def text_bytes(name: str, ids) -> bytes:
    """The exact bytes the ids of tokenizer `name` stand for (special tokens: none)."""
    table = token_bytes(name)
    return b"".join(table.token(int(i)) for i in ids)


def tiny_model(name: str, hidden: int, seed: int = 0):
    """A 1-layer GPT-2 or Llama (by the tokenizer's family) over tokenizer `name`."""
    vocab = len(tokenizer(name))
    return tiny_gpt2(vocab, hidden=hidden, seed=seed) if name == "gpt2" else tiny_llama(vocab, hidden=hidden, seed=seed)


def example_batch(pair: str) -> Batch:
    """The data loader's batch of `EXAMPLES` for a pair (sample ids 0..2, prompts `PROMPTS`)."""
    student_name, teacher_name = PAIRS[pair]
    s_tok, t_tok = tokenizer(student_name), tokenizer(teacher_name)
    same = same_vocabulary(t_tok, s_tok)
    rows = tokenize_split(
        list(EXAMPLES), s_tok, None if same else t_tok, CFG, aligner=None if same else eta(t_tok, s_tok), split="valid"
    )
    return collate(
        [rows[i] for i in range(len(rows))], student_pad_id=s_tok.pad_token_id, teacher_pad_id=t_tok.pad_token_id
    )


def policy_context(
    pair: str,
    *,
    teacher=None,
    max_length: int = CFG.max_length,
    seed: int = 0,
    cache_dir: str = "",
    objective: Any = None,
) -> PolicyContext:
    """What `dskd.run.components.build_policy` gives a policy, for a pair of the bundled tokenizers."""
    student_name, teacher_name = PAIRS[pair]
    s_tok, t_tok = tokenizer(student_name), tokenizer(teacher_name)
    if teacher is None:
        teacher = LocalTeacher(tiny_model(teacher_name, 24, seed=1), t_tok)
    return PolicyContext(
        student=tiny_model(student_name, 16),
        student_tokenizer=s_tok,
        teacher=teacher,
        aligner=None if same_vocabulary(t_tok, s_tok) else eta(t_tok, s_tok),
        data=dataclasses.replace(CFG, max_length=max_length),
        seed=seed,
        prompts=PROMPTS,
        cache_dir=cache_dir,
        objective=objective,
    )


def gpt2_config(hidden: int) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": 50257,
        "n_embd": hidden,
        "n_layer": 1,
        "n_head": 2,
        "n_positions": 256,
        "attn_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "tie_word_embeddings": True,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
    }


def toml_table(name: str, options: dict[str, Any]) -> str:
    return f"\n[{name}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in options.items())


def write_policy_job(
    tmp: Path,
    *,
    vocab: str,
    objective: str,
    policy: str = "off_policy",
    options: dict[str, Any] | None = None,
    steps: int = 2,
    samples: int = 16,
    extra: str = "",
) -> Path:
    """A tiny job distilling with `policy` (its `options`) and `objective`; `vocab` is "same" or "different"."""
    policy_table = toml_table("policy", {"name": policy, **(options or {})})
    path = write_job(tmp, samples=samples, objective=objective, steps=steps, extra=policy_table + extra)
    if vocab == "different":
        (tmp / "student" / "config.json").write_text(json.dumps(gpt2_config(16)))
        (tmp / "teacher" / "config.json").write_text(json.dumps(llama_config(24)))
        text = path.read_text()
        text = text.replace(
            f'[teacher]\nconfig = "teacher"\ntokenizer = "{TOKENIZERS / "tinyllama"}"',
            f'[teacher]\nconfig = "teacher"\ntokenizer = "{TOKENIZERS / "mistral"}"',
        )
        text = text.replace(
            f'[student]\nconfig = "student"\ntokenizer = "{TOKENIZERS / "tinyllama"}"',
            f'[student]\nconfig = "student"\ntokenizer = "{TOKENIZERS / "gpt2"}"',
        )
        assert "mistral" in text and "gpt2" in text, "tiny_job.write_job changed its [teacher]/[student] layout"
        path.write_text(text)
    elif vocab != "same":
        raise ValueError(f"vocab must be 'same' or 'different', got {vocab!r}")
    return path


def make_job(path: Path, overrides: list[str] = (), *, resume: bool = False) -> Job:
    """A `Job` for the TOML at `path`, relative paths resolved from its folder (as `dskd run` does)."""
    job = Job(load_config(path, list(overrides), registry=REGISTRY), REGISTRY, resume=resume)
    job.prepare_run_dir()
    return job


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
