"""A tiny job with two teachers of different tokenizers (Mistral and TinyLlama) and a GPT-2-tokenizer student,
built on `tiny_job` (its [teacher] table becomes two [[teachers]] entries)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tiny_job import TOKENIZERS, llama_config, write_job

ARITHMETIC = ["arithmetic/*"]
OTHERS = ["list/*", "string/*", "conversion/*"]


def teachers_toml(teachers: list[dict]) -> str:
    out = []
    for entry in teachers:
        out.append("[[teachers]]")
        for key, value in entry.items():
            out.append(f"{key} = {toml(value)}")
        out.append("")
    return "\n".join(out)


def toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()) + " }"
    return repr(value)


def two_teachers(*, routed: bool = True, weights=(1.0, 1.0)) -> list[dict]:
    """Teacher "mistral" (Mistral tokenizer) and "tinyllama" (TinyLlama tokenizer), tiny random Llama models; routed:
    arithmetic to the first, everything else to the second."""
    a = {"name": "mistral", "config": "teacher", "tokenizer": str(TOKENIZERS / "mistral"), "weight": weights[0]}
    b = {"name": "tinyllama", "config": "teacher2", "tokenizer": str(TOKENIZERS / "tinyllama"), "weight": weights[1]}
    if routed:
        a["route"] = {"category": ARITHMETIC}
        b["route"] = {"category": OTHERS}
    return [a, b]


def write_multi_job(tmp: Path, teachers: list[dict] | None = None, *, extra: str = "", **kwargs) -> Path:
    """`tiny_job.write_job` with `teachers` in place of its [teacher] table and a GPT-2-tokenizer student."""
    path = write_job(tmp, extra=extra, **kwargs)
    (tmp / "teacher2").mkdir(exist_ok=True)
    (tmp / "teacher2" / "config.json").write_text(json.dumps(llama_config(20)))
    (tmp / "student" / "config.json").write_text(json.dumps(llama_config(16, vocab=50257)))
    text = path.read_text()
    text = re.sub(r"\[teacher\]\nconfig = \"teacher\"\ntokenizer = \"[^\"]*\"\n", "", text)
    text = text.replace(f'tokenizer = "{TOKENIZERS / "tinyllama"}"', f'tokenizer = "{TOKENIZERS / "gpt2"}"', 1)
    text += '\n[aligner]\nname = "eta"\n\n' + teachers_toml(two_teachers() if teachers is None else teachers)
    path.write_text(text)
    return path
