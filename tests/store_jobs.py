"""Shared by the teacher-store tests: a tiny job (tests/tiny_job.py) and a store built from its teacher, and the
live teacher's signal for the same batches, to compare against."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tiny_job import TOKENIZERS, llama_config, write_job

from dskd.config import load_config
from dskd.data.batching import collate
from dskd.registry import load_registry
from dskd.run.components import build_teacher
from dskd.run.job import Job
from dskd.store.build import BuildOptions, build_store

REGISTRY = load_registry()


def store_job(tmp: Path, *, samples: int = 12, student: str = "tinyllama", **job) -> Path:
    """A tiny job whose student uses the tokenizer `student` (its config sized to that vocabulary)."""
    path = write_job(tmp, samples=samples, **job)
    if student != "tinyllama":
        vocab = 50304 if student == "gpt2" else 32768
        (tmp / "student" / "config.json").write_text(json.dumps(llama_config(16, vocab=vocab)))
        text = path.read_text().replace(
            f'tokenizer = "{TOKENIZERS / "tinyllama"}"\n\n[data]', f'tokenizer = "{TOKENIZERS / student}"\n\n[data]'
        )
        path.write_text(text)
    return path


def build(tmp: Path, overrides: list[str] = (), **options) -> tuple[Path, Path]:
    """(job TOML, finished store) of a fresh tiny job in `tmp`."""
    tmp.mkdir(parents=True, exist_ok=True)
    path = store_job(tmp)
    config = load_config(path, list(overrides), registry=REGISTRY)
    options.setdefault("batch_size", 4)
    options.setdefault("shard_samples", 5)
    report = build_store(config, REGISTRY, tmp / "store", BuildOptions(**options))
    assert report.finished
    return path, tmp / "store"


def live_batches(path: Path, overrides: list[str], orders: list[list[int]]):
    """The job's live teacher and collated batches of its training samples in the given orders."""
    config = load_config(path, list(overrides), registry=REGISTRY)
    teacher = build_teacher(config, torch.device("cpu"))
    dataset = Job(config, REGISTRY).tokenized("train", teacher.tokenizer, None)
    rows = [
        {
            "student_ids": r["student_ids"],
            "teacher_ids": r["student_ids"],
            "student_prompt_len": r["student_prompt_len"],
            "teacher_prompt_len": r["student_prompt_len"],
            "sample_id": r["sample_id"],
        }
        for r in dataset
    ]
    pad = teacher.tokenizer.pad_token_id
    return teacher, [collate([rows[i] for i in order], student_pad_id=pad, teacher_pad_id=pad) for order in orders]
