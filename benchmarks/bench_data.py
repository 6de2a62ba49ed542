"""Data benchmark: conversations against instruction records, and per-turn alignment against its exact bound.

- `throughput`: samples per second of tokenise + align (`dskd.data.examples.tokenize_split`, one process, no cache)
  for the chat example's conversations (`examples/chat/data/train.jsonl`: 1-3 turns, each model rendered by its own
  chat template, labels and alignment per assistant turn) against today's instruction records
  (`examples/data/tasks/train.jsonl`, the default job's template), Mistral teacher -> TinyLlama student; the
  `ratio` (conversations / instructions) has the target >= 0.5. The two are timed alternately, best of `--repeats`.
- `pairs`: for every ordered pair of the bundled tokenizers with their templates (Mistral `[INST]`, TinyLlama
  Zephyr, GPT-2 with `examples/chat/chatml.jinja`), over the chat test split: `eta_pairs` (the pipeline's per-turn
  alignment), `bound` (computed independently from the renderings' character offsets: per assistant turn, tokens
  whose spans relative to the content start coincide, edge spaces trimmed, plus the end-of-turn pair; exact for
  this ASCII data), `of_bound` = eta_pairs / bound (target 1.0), and `aligned_fraction` = eta_pairs / the
  student's assistant tokens (content and end-of-turn).
- `streaming_vs_in_memory`: null here; the streaming reader (`data.streaming`) is measured by its own branch and
  folded into this object (target >= 0.8).

Run: `python benchmarks/bench_data.py [--samples 400 --repeats 3]`; prints one JSON object and writes it to
`benchmarks/results/bench_data.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from dskd.config import DataConfig
from dskd.data import chat
from dskd.data.examples import load_examples, tokenize_split
from dskd.registry import load_registry

ROOT = Path(__file__).resolve().parents[1]
TOKENIZERS = ROOT / "examples" / "tokenizers"
CHAT = ROOT / "examples" / "chat"
TEMPLATES = {"gpt2": CHAT / "chatml.jinja"}  # the bundled tokenizers without a template of their own


def load(name: str):
    tok = AutoTokenizer.from_pretrained(TOKENIZERS / name)
    if name in TEMPLATES:
        tok.chat_template = TEMPLATES[name].read_text()
    return tok


def timed(examples, student, teacher, cfg, aligner) -> float:
    start = time.perf_counter()
    tokenize_split(examples, student, teacher, cfg, aligner=aligner)
    return len(examples) / (time.perf_counter() - start)


def throughput(samples: int, repeats: int) -> dict:
    teacher, student = load("mistral"), load("tinyllama")
    aligner = load_registry().get("aligners", "eta")(teacher, student)
    conv_cfg = DataConfig(max_length=192)
    inst_cfg = DataConfig(
        max_length=96, max_prompt_length=64, template="### Instruction:\n{instruction}\n{context}\n### Response:\n"
    )
    conversations = load_examples(CHAT / "data" / "train.jsonl", conv_cfg, "train")[:samples]
    instructions = load_examples(ROOT / "examples" / "data" / "tasks" / "train.jsonl", inst_cfg, "train")[:samples]
    conv, inst = [], []
    for _ in range(repeats):
        conv.append(timed(conversations, student, teacher, conv_cfg, aligner))
        inst.append(timed(instructions, student, teacher, inst_cfg, aligner))
    turns = sum(len(e.trained) for e in conversations) / len(conversations)
    return {
        "samples": samples,
        "assistant_turns_per_conversation": turns,
        "conversations_per_s": max(conv),
        "instructions_per_s": max(inst),
        "ratio": max(conv) / max(inst),
        "target": 0.5,
    }


def _span(text: str, a: int, b: int, origin: int):
    piece = text[a:b]
    if not piece:
        return None
    if piece.strip(" "):
        a, b = a + len(piece) - len(piece.lstrip(" ")), b - (len(piece) - len(piece.rstrip(" ")))
    return a - origin, b - origin


def bound(t_enc, s_enc) -> int:
    """Per turn, tokens (content) whose spans relative to the content start coincide, plus the end-of-turn pair."""
    total = 0
    for t_turn, s_turn in zip(t_enc.turns, s_enc.turns):
        t_spans = {_span(t_enc.text, *t_enc.offsets[i], t_turn.chars[0]) for i in range(*t_turn.content)}
        s_spans = [_span(s_enc.text, *s_enc.offsets[j], s_turn.chars[0]) for j in range(*s_turn.content)]
        total += sum(1 for span in s_spans if span is not None and span in t_spans)
        total += t_turn.marker[1] > t_turn.marker[0] and s_turn.marker[1] > s_turn.marker[0]
    return total


def pair_figures(teacher_name: str, student_name: str, examples) -> dict:
    teacher, student = load(teacher_name), load(student_name)
    aligner = load_registry().get("aligners", "eta")(teacher, student)
    cfg = DataConfig(max_length=256)
    rows = tokenize_split(examples, student, teacher, cfg, aligner=aligner)
    eta = sum(len(r) // 2 for r in rows["alignment"])
    labels = sum(int(np.sum(m)) for m in rows["student_label_mask"])
    exact = 0
    for k, e in enumerate(examples):
        t_enc = chat.encode_conversation(teacher, e.messages, side="teacher", where=f"test {k}")
        s_enc = chat.encode_conversation(student, e.messages, side="student", where=f"test {k}")
        exact += bound(t_enc, s_enc)
    return {
        "teacher": teacher_name,
        "student": student_name,
        "eta_pairs": eta,
        "bound": exact,
        "of_bound": eta / max(exact, 1),
        "student_assistant_tokens": labels,
        "aligned_fraction": eta / max(labels, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_data.json")
    args = parser.parse_args()
    examples = load_examples(CHAT / "data" / "test.jsonl", DataConfig(), "test")
    names = ("mistral", "tinyllama", "gpt2")
    pairs = [pair_figures(t, s, examples) for t in names for s in names if t != s]
    result = {
        "benchmark": "bench_data",
        "throughput": throughput(args.samples, args.repeats),
        "pairs": pairs,
        "min_of_bound": min(p["of_bound"] for p in pairs),
        "streaming_vs_in_memory": None,  # measured on the streaming branch (target >= 0.8), folded in there
        "loadavg": os.getloadavg(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    text = json.dumps(result, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
