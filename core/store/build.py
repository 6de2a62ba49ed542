"""Building a teacher store: the job's teacher, run once over its training (and held-out) split.

Samples are numbered in split order (train, then the held-out split evaluation reads) and shard `s` holds samples
`s * shard_samples ...`; worker `w` of `n` writes the shards `s` with `s % n == w`, so several processes build
one store without talking to each other. Every worker first checks the folder's `build.json` against its own
plan (same teacher, data, mode, lengths, shard size) and skips shards that are already complete, which is also
how a crashed build resumes. The worker that finds every shard complete writes the head, tokenizer, index and,
last, the manifest; a folder with a manifest is a finished store and is never written again.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from dskd.config import Config
from dskd.data.batching import collate
from dskd.data.examples import data_fingerprint
from dskd.errors import DskdError, StoreError
from dskd.models.teacher import tokenizer_fingerprint
from dskd.store.encoding import encode_rows, row_bytes, sequence_key
from dskd.store.layout import (
    FORMAT,
    HEAD,
    INDEX,
    MANIFEST,
    MODES,
    PLAN,
    PLAN_KEYS,
    SHARDS,
    TOKENIZER,
    fsync_dir,
    read_json,
    shard_stem,
    write_atomic,
    write_json_atomic,
)
from dskd.store.shards import complete_sidecar, file_sha256, write_shard
from dskd.types import SignalRequest


@dataclass(frozen=True)
class BuildOptions:
    mode: str = "hidden"
    """What each label row keeps: "hidden" (last hidden states) or "topk" (top-k log-probabilities + tail)."""
    dtype: str = ""
    """hidden: "bfloat16" (default), "float32" or "int8"; topk: "float16" (default) or "bfloat16". Empty: default."""
    k: int = 64
    """Top-k entries per row (mode topk)."""
    shard_samples: int = 256
    """Samples per shard: the unit of atomic writes, checksums, resume and parallel workers."""
    batch_size: int = 16
    """Sequences per teacher forward."""
    worker: int = 0
    """This process's worker number, in [0, workers)."""
    workers: int = 1
    """Processes building the store together (each writes every `workers`-th shard)."""

    @property
    def resolved_dtype(self) -> str:
        return self.dtype or MODES.get(self.mode, ("",))[0]


@dataclass
class BuildReport:
    root: Path
    shards_total: int
    written: int
    skipped: int
    finished: bool


def check_options(options: BuildOptions) -> None:
    if options.mode not in MODES:
        raise DskdError(f"teacher-store --mode {options.mode!r} is unknown; use {' or '.join(MODES)}")
    if options.resolved_dtype not in MODES[options.mode]:
        raise DskdError(
            f"teacher-store --dtype {options.dtype!r} does not fit mode {options.mode!r}; use one of {', '.join(MODES[options.mode])}"
        )
    for name, value, low in (("k", options.k, 1), ("shard-samples", options.shard_samples, 1)):
        if value < low:
            raise DskdError(f"teacher-store --{name} must be >= {low}, got {value}")
    if options.batch_size < 1:
        raise DskdError(f"teacher-store --batch-size must be >= 1, got {options.batch_size}")
    if not 0 <= options.worker < options.workers:
        raise DskdError(
            f"teacher-store --worker {options.worker} is outside [0, --workers {options.workers}); number the workers 0..n-1"
        )


def held_out_split(config: Config) -> str:
    """The split evaluation measures teacher agreement on (as `dskd.evaluation.stage` chooses it), or ""."""
    if config.data.valid:
        return "valid"
    split = config.eval.split
    return split if getattr(config.data, split, "") else ""


def store_splits(config: Config) -> tuple[str, ...]:
    """The training split, and the held-out split when the job evaluates (teacher agreement reads it)."""
    extra = held_out_split(config) if "eval" in config.run.stages else ""
    return ("train", extra) if extra else ("train",)


def _trained_teacher(job) -> Path | None:
    """The teacher a `dskd run` of this job would distil from: the teacher_sft stage's output when it exists."""
    path = job.run_dir / "teacher"
    if (path / "config.json").exists():
        return path
    if "teacher_sft" in job.config.run.stages:
        raise StoreError(
            f"the job trains its teacher first (stage teacher_sft) and {path} holds none yet; train it with "
            f"`dskd run JOB --set 'run.stages=[\"teacher_sft\"]'`, or drop the stage to store the configured teacher as it is"
        )
    return None


def build_store(config: Config, registry: Any, out: str | Path, options: BuildOptions, console=None) -> BuildReport:
    """Build (this worker's shards of) a teacher store of `config`'s teacher in `out`."""
    from dskd.run.components import build_teacher  # the run's modules import this package lazily too
    from dskd.run.job import Job

    check_options(options)
    root = Path(out)
    if (root / MANIFEST).exists():
        raise StoreError(
            f"{root} holds a finished teacher store, which is never overwritten; choose another --out "
            f"(`dskd teacher-store info {root}` shows what it holds)"
        )
    if config.teacher.store:
        raise StoreError(
            f"the job reads its teacher from the store {config.teacher.store} (teacher.store); build a store from a job "
            f"that names its teacher (--set teacher.store=)"
        )
    if root.exists() and not root.is_dir():
        raise StoreError(f"--out {root} is a file; choose a folder for the teacher store")
    job = Job(config, registry)
    teacher_path = _trained_teacher(job)
    teacher = build_teacher(
        config, job.device, model_path=str(teacher_path) if teacher_path else None, cache_dir=job.cache_dir
    )
    try:
        samples, fingerprints = _samples(job, teacher)
        plan = _plan(config, teacher, options, samples, fingerprints)
        _claim(root, plan)
        total = math.ceil(len(samples) / options.shard_samples)
        written = skipped = 0
        request = SignalRequest(hidden_states=True) if options.mode == "hidden" else SignalRequest(top_k=options.k)
        for shard in range(options.worker, total, options.workers):
            if complete_sidecar(root, shard) is not None:
                skipped += 1
                continue
            _remove_stale_temporaries(root, shard)
            chunk = samples[shard * options.shard_samples : (shard + 1) * options.shard_samples]
            tensors, meta = _shard_tensors(teacher, chunk, request, options, plan["vocab_size"])
            _guarded(lambda: write_shard(root, shard, tensors, meta), f"shard {shard}", root)  # noqa: B023
            written += 1
            if console is not None:
                console.print(f"teacher-store: shard {shard + 1} of {total} written ({len(chunk)} samples)")
        finished = _guarded(lambda: finalize(root, plan, teacher, total), "the index and manifest", root)
        return BuildReport(root, total, written, skipped, finished)
    finally:
        teacher.close()


def _remove_stale_temporaries(root: Path, shard: int) -> None:
    """Temporary files of this shard left by a crashed build (only this worker writes this shard)."""
    for path in (root / SHARDS).glob(f".{shard_stem(shard)}.*.tmp-*"):
        path.unlink(missing_ok=True)


def _samples(job, teacher) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Every sample of the stored splits as `{split, sample_id, ids, prompt_len}`, tokenised with the teacher's
    tokenizer exactly as a training run tokenises its teacher side, and each split's data fingerprint."""
    samples, fingerprints = [], {}
    for split in store_splits(job.config):
        examples = job.examples(split)
        fingerprints[split] = data_fingerprint(examples)
        dataset = job.tokenized(split, teacher.tokenizer, None, examples=examples)
        for row in dataset:
            samples.append(
                {
                    "split": split,
                    "sample_id": int(row["sample_id"]),
                    "ids": list(row["student_ids"]),
                    "prompt_len": int(row["student_prompt_len"]),
                }
            )
    return samples, fingerprints


def _plan(config: Config, teacher, options: BuildOptions, samples, fingerprints) -> dict[str, Any]:
    from dskd.models.loading import teacher_dtype

    plan = {
        "format": FORMAT,
        "mode": options.mode,
        "dtype": options.resolved_dtype,
        "k": options.k if options.mode == "topk" else 0,
        "teacher_fingerprint": teacher.fingerprint,
        "tokenizer_fingerprint": tokenizer_fingerprint(teacher.tokenizer),
        "teacher_dtype": teacher_dtype(teacher),
        "hidden_size": teacher.hidden_size,
        "vocab_size": teacher.vocab_size,
        "splits": list(fingerprints),
        "data_fingerprints": fingerprints,
        "samples": len(samples),
        "shard_samples": options.shard_samples,
        "max_length": config.data.max_length,
        "max_prompt_length": config.data.max_prompt_length,
    }
    assert tuple(plan) == PLAN_KEYS  # the layout module documents these keys
    return plan


def _claim(root: Path, plan: dict[str, Any]) -> None:
    """Write the plan into a new folder, or check that a partial build there follows the same plan."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"--out {root} cannot be created ({exc.strerror}); choose another folder") from None
    existing = read_json(root / PLAN)
    if existing is None:
        if (root / PLAN).exists():
            raise StoreError(f"{root / PLAN} is not a build plan (unreadable); choose another --out")
        # a temporary plan left by a build killed while writing it is no reason to refuse the folder
        if any(p.name != PLAN and not p.name.startswith(f".{PLAN}.tmp-") for p in root.iterdir()):
            raise StoreError(
                f"--out {root} is not empty and holds no teacher-store build; choose an empty or new folder"
            )
        _guarded(lambda: write_json_atomic(root / PLAN, plan), "the build plan", root)
        return
    differs = [key for key in PLAN_KEYS if existing.get(key) != plan[key]]
    if differs:
        raise StoreError(
            f"{root} holds a partial teacher-store build with another {', '.join(differs)}; resume it with the same job "
            f"and options, or choose another --out"
        )


def _shard_tensors(teacher, chunk, request: SignalRequest, options: BuildOptions, vocab_size: int):
    pad = teacher.tokenizer.pad_token_id
    pieces: list[dict[str, torch.Tensor]] = []
    ids, id_offsets, prompt_lens, row_offsets, keys = [], [0], [], [0], []
    for start in range(0, len(chunk), options.batch_size):
        part = chunk[start : start + options.batch_size]
        rows = [
            {
                "student_ids": s["ids"],
                "teacher_ids": s["ids"],
                "student_prompt_len": s["prompt_len"],
                "teacher_prompt_len": s["prompt_len"],
                "sample_id": s["sample_id"],
            }
            for s in part
        ]
        batch = collate(rows, student_pad_id=pad, teacher_pad_id=pad)
        signal = teacher.score(batch.teacher_input_ids, batch.teacher_attention_mask, batch.teacher_rows, request)
        expected = [len(s["ids"]) - s["prompt_len"] for s in part]
        if signal.rows_per_sequence.tolist() != expected:
            raise StoreError(
                f"the teacher answered {signal.rows_per_sequence.tolist()} rows for sequences with {expected} label rows; "
                f"it does not follow the Teacher interface"
            )
        pieces.append(encode_rows(options.mode, options.resolved_dtype, signal, vocab_size))
        for s in part:
            ids.extend(s["ids"])
            id_offsets.append(len(ids))
            prompt_lens.append(s["prompt_len"])
            row_offsets.append(row_offsets[-1] + len(s["ids"]) - s["prompt_len"])
            keys.append(sequence_key(s["ids"][:-1]))
    tensors = {name: torch.cat([p[name] for p in pieces]) for name in pieces[0]}
    row_tensors = sorted(tensors)
    tensors.update(
        ids=torch.tensor(ids, dtype=torch.int32),
        id_offsets=torch.tensor(id_offsets, dtype=torch.int64),
        prompt_len=torch.tensor(prompt_lens, dtype=torch.int32),
        row_offsets=torch.tensor(row_offsets, dtype=torch.int64),
    )
    meta = {
        "samples": len(chunk),
        "rows": row_offsets[-1],
        "keys": keys,
        "row_tensors": row_tensors,
        "sample_ids": [[s["split"], s["sample_id"]] for s in chunk],
    }
    return tensors, meta


def _guarded(write, what: str, root: Path):
    """Run a write; a full disk or another OS error becomes one sentence (the write itself left nothing half-done)."""
    try:
        return write()
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise StoreError(
                f"disk full while writing {what} of the teacher store {root} ({exc.strerror}); nothing incomplete is "
                f"left that reads as complete: free space and run the same command again to resume after the last complete shard"
            ) from None
        raise StoreError(f"cannot write {what} of the teacher store {root} ({exc.strerror or exc})") from None


def finalize(root: Path, plan: dict[str, Any], teacher, total: int) -> bool:
    """Write head, tokenizer, index and manifest once every shard is complete; False while some are missing."""
    sidecars = [complete_sidecar(root, shard) for shard in range(total)]
    if any(s is None for s in sidecars) or (root / MANIFEST).exists():
        return (root / MANIFEST).exists()
    head = teacher.head
    tensors = {"weight": head.weight.detach().cpu().clone()}
    if head.bias is not None:
        tensors["bias"] = head.bias.detach().cpu().clone()
    embeddings = getattr(teacher, "embeddings", None)
    if embeddings is None:
        kept = "none"
    elif embeddings.shape == head.weight.shape and torch.equal(embeddings.cpu(), tensors["weight"]):
        kept = "tied"  # the head's weight is the embedding table: stored once
    else:
        kept = "stored"
        tensors["embeddings"] = embeddings.detach().cpu().clone()
    write_atomic(root / HEAD, save(tensors))
    tokenizer_files = _write_tokenizer(root, teacher.tokenizer)
    write_json_atomic(root / INDEX, {"format": FORMAT, "shards": sidecars})
    manifest = {
        **plan,
        "shards": total,
        "label_rows": sum(s["rows"] for s in sidecars),
        "shard_bytes": sum(s["bytes"] for s in sidecars),
        "row_bytes": row_bytes(plan["mode"], plan["dtype"], plan["hidden_size"], plan["k"], plan["vocab_size"]),
        "head": {
            "sha256": file_sha256(root / HEAD),
            "dtype": str(head.weight.dtype).removeprefix("torch."),
            "scale": head.scale,
            "softcap": head.softcap,
            "bias": head.bias is not None,
            "embeddings": kept,
        },
        "tokenizer_files": tokenizer_files,
        "index_sha256": file_sha256(root / INDEX),
    }
    write_json_atomic(root / MANIFEST, manifest)
    return True


def _write_tokenizer(root: Path, tokenizer) -> dict[str, str]:
    """The tokenizer's files in DIR/tokenizer (a folder renamed into place), with their sha256."""
    target = root / TOKENIZER
    if not target.is_dir():
        tmp = root / f".{TOKENIZER}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tokenizer.save_pretrained(str(tmp))
            os.replace(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not target.is_dir():  # another worker's identical copy won the rename otherwise
                raise
        fsync_dir(root)
    return {p.name: file_sha256(p) for p in sorted(target.iterdir()) if p.is_file()}
