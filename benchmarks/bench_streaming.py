"""Streaming benchmark: samples/s from a data file to training batches, streamed (`data.streaming = true`) against
in memory (the baseline), in the same run, on the same corpus and tokenizer pair.

Both paths do the same work per sample: read the record, render the prompt, tokenise it for the student and the
teacher, align the two label sequences with ETA and collate micro-batches.
- in memory: `load_examples` + `tokenize_split` (no cache, so it really tokenises) + every batch of the
  `ResumableBatchSampler` in file order collated, as `dskd run` does;
- streaming: `StreamBatches` over the file until it ends (read in order, encoded in the same workers).

Corpus: the first `--samples` records of examples/data/tasks/train.jsonl, teacher GPT-2, student TinyLlama (their
vocabularies differ, so every sample is aligned). Each variant runs `--repeats` times, interleaved so that a change
in the machine's load hits both alike, and the best time of each is reported. `ratio` = streamed / in-memory
samples/s (target >= 0.8). `resume_s` is the time from a fresh stream loaded with the position after half the
batches to its next batch, beside `first_batch_s` of a stream from the start (the position is seeked, not
re-encoded). The JSON goes to stdout and to benchmarks/results/bench_streaming.json.

Run: `python benchmarks/bench_streaming.py [--samples 2000] [--workers 0 2] [--repeats 3]`; `ratio` at the top is
the lowest over the worker counts.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer

from dskd.config import DataConfig
from dskd.data.batching import ResumableBatchSampler, collate
from dskd.data.examples import load_examples, tokenize_split
from dskd.data.streaming import StreamBatches, StreamSpec
from dskd.errors import DataExhausted
from dskd.plugins.aligners.eta import eta

REPO = Path(__file__).resolve().parents[1]
TOKENIZERS = REPO / "examples" / "tokenizers"
CORPUS = REPO / "examples" / "data" / "tasks" / "train.jsonl"
CFG = DataConfig(max_length=512, max_prompt_length=256)


def in_memory(path: Path, student, teacher, aligner, batch: int, workers: int) -> int:
    examples = load_examples(path, CFG, "train")
    dataset = tokenize_split(examples, student, teacher, CFG, aligner=aligner, num_workers=workers)
    gather = functools.partial(collate, student_pad_id=student.pad_token_id, teacher_pad_id=teacher.pad_token_id)
    sampler = ResumableBatchSampler(len(dataset), batch, shuffle=False, infinite=False)
    return sum(gather([dataset[i] for i in indices]).size for indices in sampler)


def streamed(path: Path, student, teacher, aligner, batch: int, workers: int) -> int:
    batches = make_stream(path, student, teacher, aligner, batch, workers)
    done = 0
    try:
        while True:
            done += next(batches).size
    except DataExhausted:
        return done


def make_stream(path, student, teacher, aligner, batch, workers, consumed=0) -> StreamBatches:
    gather = functools.partial(collate, student_pad_id=student.pad_token_id, teacher_pad_id=teacher.pad_token_id)
    spec = StreamSpec(str(path), CFG, "train", batch)
    return StreamBatches(spec, student, teacher, aligner, gather, consumed=consumed, num_workers=workers)


def resume_timing(path: Path, student, teacher, aligner, batch: int, batches: int) -> dict[str, float]:
    first = make_stream(path, student, teacher, aligner, batch, 0)
    started = time.perf_counter()
    next(first)
    first_batch_s = time.perf_counter() - started
    half = batches // 2
    for _ in range(half - 1):
        next(first)
    position = first.state_dict(half)
    resumed = make_stream(path, student, teacher, aligner, batch, 0, consumed=half)
    resumed.load_state_dict(position)
    started = time.perf_counter()
    next(resumed)
    return {"first_batch_s": round(first_batch_s, 3), "resume_s": round(time.perf_counter() - started, 3)}


def measure(path: Path, student, teacher, aligner, batch: int, workers: int, repeats: int) -> dict:
    seconds: dict[str, list[float]] = {"in_memory": [], "streaming": []}
    counts: dict[str, int] = {}
    for _ in range(repeats):
        for name, run in (("in_memory", in_memory), ("streaming", streamed)):
            started = time.perf_counter()
            counts[name] = run(path, student, teacher, aligner, batch, workers)
            seconds[name].append(time.perf_counter() - started)
    assert counts["in_memory"] == counts["streaming"], counts  # the same samples, or the comparison means nothing
    rate = {name: counts[name] / min(times) for name, times in seconds.items()}
    return {
        "workers": workers,
        "samples": counts["streaming"],
        "streaming_samples_per_s": round(rate["streaming"], 1),
        "baseline": {"in_memory_samples_per_s": round(rate["in_memory"], 1)},
        "ratio": round(rate["streaming"] / rate["in_memory"], 3),
        "seconds": {name: [round(t, 2) for t in times] for name, times in seconds.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000, help="records of the corpus used")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[0, 2],
        help="worker processes of both paths (0: this one), each measured",
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing repeats (the best is reported)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    student = AutoTokenizer.from_pretrained(TOKENIZERS / "tinyllama")
    teacher = AutoTokenizer.from_pretrained(TOKENIZERS / "gpt2")
    for tokenizer in (student, teacher):
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    aligner = eta(teacher, student)
    folder = Path(tempfile.mkdtemp(prefix="dskd-bench-streaming-"))
    path = folder / "train.jsonl"
    path.write_text("\n".join(CORPUS.read_text(encoding="utf-8").splitlines()[: args.samples]) + "\n", encoding="utf-8")
    load_before = os.getloadavg()
    runs = [
        measure(path, student, teacher, aligner, args.batch_size, workers, args.repeats) for workers in args.workers
    ]
    result = {
        "benchmark": "streaming",
        "corpus": f"examples/data/tasks/train.jsonl, first {args.samples} records",
        "pair": "teacher gpt2, student tinyllama, aligner eta",
        "batch_size": args.batch_size,
        "ratio": min(run["ratio"] for run in runs),  # the worst of the worker counts measured
        "target_ratio": 0.8,
        "runs": runs,
        **resume_timing(path, student, teacher, aligner, args.batch_size, runs[0]["samples"] // args.batch_size),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs",
    }
    text = json.dumps(result, indent=2)
    print(text)
    out = REPO / "benchmarks" / "results" / "bench_streaming.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
