"""What a teacher store costs and saves: bytes per stored token per mode, the fidelity of the KD loss computed from
the store against the live teacher, the distillation step time from a store against a live in-process teacher and
a teacher server, and one store distilled into three students of different tokenizers.

The teacher is the default job's (`examples/models/teacher-llama`: Llama, d = 256, 4 layers, Mistral tokenizer),
trained here by the job's own teacher_sft stage for `--teacher-steps` steps (0: random init) on the first
`--samples` training samples, which every part below uses too.

- Bytes: a store per mode built from the bf16 teacher on the first `--fidelity-samples` samples; `signal_bytes_per_token` is the layout's bytes per label row
  (hidden bf16 = 2·d; top-k = k ids + k log-probabilities + a float32 tail), `shard_bytes_per_token` what the shard
  files take per label token with the ids, offsets and headers. DistillKit publishes about 300 B a token at k = 128.
- Fidelity: per-token forward KL of a random student (Mistral tokenizer, the teacher's vocabulary) to the teacher,
  at temperature 1, with the teacher's distribution from the store against the same bf16 teacher's live forward;
  relative difference of the summed loss, and the largest per-token relative difference.
- Step time: `dskd_v2` + `eta` distillation of the default job's GPT-2 student, student tokens/s over the log
  intervals after the first (warm-up), with the float32 teacher in process, served from a teacher server on
  loopback (its own process, `--server-threads` threads), and from a store of it (hidden, bf16).
- Three students: GPT-2, TinyLlama and Mistral-tokenizer students (the default student configs) distilled from
  the one store for `--student-steps` steps each, then evaluated by the eval stage (ROUGE-L on the first
  `--eval-samples` test samples, teacher agreement and KL on the validation split).

    python benchmarks/bench_teacher_store.py [--samples 1024] [--teacher-steps 200] [--steps 40] [--student-steps 100]

Prints one JSON object and writes it to benchmarks/results/bench_teacher_store.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # a co-located teacher server (as bench_remote_teacher)

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the teacher-server harness the tests use

from teacher_server_harness import start_servers  # noqa: E402

from dskd.config import load_config  # noqa: E402
from dskd.console import Console  # noqa: E402
from dskd.data.batching import collate  # noqa: E402
from dskd.kit.lm_head import head_from_model, last_hidden_state  # noqa: E402
from dskd.models.loading import load_model  # noqa: E402
from dskd.plugins.divergences.forward_kl import forward_kl  # noqa: E402
from dskd.registry import load_registry  # noqa: E402
from dskd.run.components import build_teacher  # noqa: E402
from dskd.run.job import Job  # noqa: E402
from dskd.store.build import BuildOptions, build_store  # noqa: E402
from dskd.store.teacher import StoreTeacher  # noqa: E402
from dskd.types import SignalRequest, SparseTeacher  # noqa: E402

REGISTRY = load_registry()
TOKENIZERS = REPO / "examples" / "tokenizers"
MODELS = REPO / "examples" / "models"


class Bench:
    def __init__(self, root: Path, samples: int) -> None:
        self.root = root
        self.train = train = root / "train.jsonl"
        lines = (REPO / "examples/data/tasks/train.jsonl").read_text().splitlines()[:samples]
        train.write_text("\n".join(lines) + "\n")
        self.base = [f"data.train={train}", f"data.cache_dir={root / 'cache'}", "run.log_every=10"]

    def config(self, name: str, overrides: list[str]):
        return load_config(
            REPO / "dskd.toml", self.base + [f"run.output_dir={self.root / name}"] + overrides, registry=REGISTRY
        )

    def job(self, name: str, overrides: list[str]) -> Job:
        job = Job(self.config(name, overrides), REGISTRY)
        job.console = Console(stderr=True)  # stdout carries the JSON only
        return job


def train_teacher(bench: Bench, steps: int) -> list[str]:
    """Overrides naming the benchmark's teacher: the job's teacher trained for `steps` steps, or its random init."""
    if steps == 0:
        return []
    job = bench.job(
        "teacher",
        ['run.stages=["teacher_sft"]', f"teacher_sft.steps={steps}", f"teacher_sft.warmup_steps={min(10, steps)}"],
    )
    job.prepare_run_dir()
    path = job.teacher_sft()
    return [f"teacher.model={path}", 'teacher.config=""', f"teacher.tokenizer={path}"]


def build(bench: Bench, name: str, teacher: list[str], extra: list[str], **options) -> Path:
    config = bench.config(name + "-job", ['run.stages=["distill", "eval"]'] + teacher + extra)
    out = bench.root / name
    build_store(config, REGISTRY, out, BuildOptions(batch_size=16, shard_samples=256, **options))
    return out


def bytes_and_fidelity(bench: Bench, teacher: list[str], fidelity_samples: int) -> dict:
    # the first `fidelity_samples` training samples only: a bf16 teacher is slow on a CPU, and bytes per token and
    # fidelity are per-token figures
    subset = bench.root / "fidelity.jsonl"
    subset.write_text("".join(Path(bench.train).read_text().splitlines(keepends=True)[:fidelity_samples]))
    bf16 = teacher + ["teacher.dtype=bfloat16", f"data.train={subset}"]
    only_train = ['run.stages=["distill"]']
    stores = {
        "hidden_bf16": build(bench, "store-hidden-bf16", bf16, only_train),
        "hidden_int8": build(bench, "store-hidden-int8", bf16, only_train, dtype="int8"),
        "topk_64": build(bench, "store-topk-64", bf16, only_train, mode="topk", k=64),
        "topk_128": build(bench, "store-topk-128", bf16, only_train, mode="topk", k=128),
    }
    out = {"bytes": {}, "fidelity": {}}
    for name, folder in stores.items():
        manifest = json.loads((folder / "manifest.json").read_text())
        out["bytes"][name] = {
            "signal_bytes_per_token": manifest["row_bytes"],
            "shard_bytes_per_token": round(manifest["shard_bytes"] / manifest["label_rows"], 1),
        }
    # live bf16 teacher and a random student of the teacher's tokenizer, on the stored training samples
    config = bench.config("fidelity", bf16)
    live = build_teacher(config, torch.device("cpu"))
    student_cfg = json.loads((MODELS / "student-llama" / "config.json").read_text())
    student_cfg["vocab_size"] = live.vocab_size
    (bench.root / "config-student-fidelity").mkdir(exist_ok=True)
    (bench.root / "config-student-fidelity" / "config.json").write_text(json.dumps(student_cfg))
    student = load_model(
        config.student.__class__(config=str(bench.root / "config-student-fidelity")), "student", seed=0
    )
    student_head = head_from_model(student, live.vocab_size, name="student").detached()
    dataset = Job(config, REGISTRY).tokenized("train", live.tokenizer, None)
    pad = live.tokenizer.pad_token_id
    rows = [
        {
            "student_ids": r["student_ids"],
            "teacher_ids": r["student_ids"],
            "student_prompt_len": r["student_prompt_len"],
            "teacher_prompt_len": r["student_prompt_len"],
            "sample_id": r["sample_id"],
        }
        for r in dataset.select(range(min(fidelity_samples, len(dataset))))
    ]
    opened = {name: StoreTeacher(folder) for name, folder in stores.items() if name != "topk_128"}
    losses: dict[str, list[torch.Tensor]] = {name: [] for name in ["live", "live_topk_64", *opened]}
    with torch.no_grad():
        for start in range(0, len(rows), 16):
            batch = collate(rows[start : start + 16], student_pad_id=pad, teacher_pad_id=pad)
            args = (batch.teacher_input_ids, batch.teacher_attention_mask, batch.teacher_rows)
            hidden = last_hidden_state(student, batch.teacher_input_ids, batch.teacher_attention_mask)
            z_s = student_head.logits(hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.teacher_rows))
            signal = live.score(*args, SignalRequest(hidden_states=True, top_k=64))
            losses["live"].append(forward_kl(z_s, live.head.logits(signal.hidden_states)))
            sparse = SparseTeacher(signal.topk_ids, signal.topk_logprobs, signal.tail_logmass)
            losses["live_topk_64"].append(forward_kl(z_s, sparse))
            for name, store in opened.items():
                if name.startswith("hidden"):
                    z_t = store.head.logits(store.score(*args, SignalRequest(hidden_states=True)).hidden_states)
                    losses[name].append(forward_kl(z_s, z_t))
                else:
                    got = store.score(*args, SignalRequest(top_k=64))
                    losses[name].append(
                        forward_kl(z_s, SparseTeacher(got.topk_ids, got.topk_logprobs, got.tail_logmass))
                    )
    per_token = {name: torch.cat(values).double() for name, values in losses.items()}

    def compare(mine: torch.Tensor, reference: torch.Tensor) -> dict:
        return {
            "loss_rel_diff": float((mine.sum() - reference.sum()).abs() / reference.sum().abs()),
            "max_token_rel_diff": float(((mine - reference).abs() / reference.abs().clamp_min(1e-12)).max()),
        }

    out["fidelity"] = {
        "tokens": int(per_token["live"].numel()),
        "mean_kd_loss_live": float(per_token["live"].mean()),
        "hidden_bf16_vs_live_bf16": compare(per_token["hidden_bf16"], per_token["live"]),
        "hidden_int8_vs_live_bf16": compare(per_token["hidden_int8"], per_token["live"]),
        "topk_64_vs_live_dense": compare(per_token["topk_64"], per_token["live"]),
        "topk_64_vs_live_topk_64": compare(per_token["topk_64"], per_token["live_topk_64"]),
    }
    for store in opened.values():
        store.close()
    return out


def tokens_per_s(bench: Bench, name: str, overrides: list[str], steps: int) -> tuple[float, float]:
    """Student tokens/s and the fraction of the time the step stood waiting for its teacher signal."""
    job = bench.job(
        name,
        [
            'run.stages=["distill"]',
            f"train.max_steps={steps}",
            f"train.warmup_steps={min(20, steps)}",
            f"run.log_every={max(steps // 4, 1)}",
        ]
        + overrides,
    )
    job.prepare_run_dir()
    job.distill(None)
    lines = [json.loads(line) for line in (job.run_dir / "metrics.jsonl").read_text().splitlines()]
    later = lines[1:]  # the first interval holds the warm-up
    waits = [line.get("perf/teacher_wait_fraction", 0.0) for line in later]
    return sum(line["perf/tokens_per_s"] for line in later) / len(later), sum(waits) / len(waits)


def signal_times(bench: Bench, teacher: list[str], store: Path, batches: int = 12) -> dict:
    """Milliseconds to get one batch's teacher signal (16 sequences, hidden states): the live float32 teacher's
    forward against the store's read, interleaved batch by batch, so a shared machine's load falls on both alike."""
    config = bench.config("signal-times", teacher)
    live = build_teacher(config, torch.device("cpu"))
    stored = StoreTeacher(store)
    dataset = Job(config, REGISTRY).tokenized("train", live.tokenizer, None)
    pad = live.tokenizer.pad_token_id
    request = SignalRequest(hidden_states=True)
    times: dict[str, list[float]] = {"live": [], "store": []}
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    batches = min(batches, len(dataset) // 16)
    for b in range(batches):
        rows = [dataset[i] for i in order[b * 16 : (b + 1) * 16]]
        batch = collate(
            [
                {
                    "student_ids": r["student_ids"],
                    "teacher_ids": r["student_ids"],
                    "student_prompt_len": r["student_prompt_len"],
                    "teacher_prompt_len": r["student_prompt_len"],
                    "sample_id": r["sample_id"],
                }
                for r in rows
            ],
            student_pad_id=pad,
            teacher_pad_id=pad,
        )
        args = (batch.teacher_input_ids, batch.teacher_attention_mask, batch.teacher_rows, request)
        for name, source in (("live", live), ("store", stored)):
            started = time.perf_counter()
            source.score(*args)
            times[name].append((time.perf_counter() - started) * 1000)
    stored.close()
    live_ms, store_ms = (
        sorted(v[1:])[len(v[1:]) // 2] for v in (times["live"], times["store"])
    )  # medians after one warm-up
    return {"batches": batches, "live_forward_ms": round(live_ms, 2), "store_read_ms": round(store_ms, 2)}


def step_times(bench: Bench, teacher: list[str], store: Path, steps: int, server_threads: int) -> dict:
    cores = os.cpu_count() or 1
    live, live_wait = tokens_per_s(bench, "step-live", teacher, steps)
    stored, store_wait = tokens_per_s(
        bench, "step-store", [f"teacher.store={store}", 'teacher.config=""', 'teacher.model=""'], steps
    )
    teacher_dir = next((o.split("=", 1)[1] for o in teacher if o.startswith("teacher.model=")), "")
    served = served_wait = None
    if teacher_dir:  # a server needs a saved model (the trained teacher)
        [server] = start_servers([(Path(teacher_dir), (), "teacher")], bench.root / "servers", threads=server_threads)
        try:
            served, served_wait = tokens_per_s(
                bench,
                "step-server",
                [
                    f'teacher.address=["{server.address}"]',
                    'teacher.config=""',
                    'teacher.model=""',
                    f"teacher.cache_dir={bench.root / 'client-cache'}",
                ],
                steps,
            )
        finally:
            server.stop()
        torch.set_num_threads(cores)
    return {
        "steps": steps,
        "live_tokens_per_s": round(live, 1),
        "store_tokens_per_s": round(stored, 1),
        "server_tokens_per_s": None if served is None else round(served, 1),
        "store_vs_live_speedup": round(stored / live, 3),
        # the in-process teacher's forward is the time the live step waits for it: removing all of it bounds the
        # speedup any store can give at 1 / (1 - fraction)
        "live_teacher_wait_fraction": round(live_wait, 3),
        "speedup_bound_from_live_wait": round(1 / max(1 - live_wait, 1e-9), 3),
        "store_teacher_wait_fraction": round(store_wait, 4),
        "server_teacher_wait_fraction": None if served_wait is None else round(served_wait, 4),
        "store_vs_server_speedup": None if served is None else round(stored / served, 3),
    }


STUDENTS = {
    "gpt2": ("student-gpt2", "gpt2", None),
    "tinyllama": ("student-llama", "tinyllama", None),
    "mistral": ("student-llama", "mistral", 32768),
}


def three_students(bench: Bench, store: Path, steps: int, eval_samples: int) -> dict:
    results = {}
    for name, (model, tokenizer, vocab) in STUDENTS.items():
        config_dir = MODELS / model
        if vocab is not None:  # the Llama student sized to the Mistral tokenizer
            config = json.loads((config_dir / "config.json").read_text())
            config["vocab_size"] = vocab
            config_dir = bench.root / f"config-student-{name}"
            config_dir.mkdir(exist_ok=True)
            (config_dir / "config.json").write_text(json.dumps(config))
        started = time.perf_counter()
        job = bench.job(
            f"student-{name}",
            [
                'run.stages=["distill", "eval"]',
                f"teacher.store={store}",
                'teacher.config=""',
                'teacher.model=""',
                f"student.config={config_dir}",
                f"student.tokenizer={TOKENIZERS / tokenizer}",
                f"train.max_steps={steps}",
                f"train.warmup_steps={min(20, steps)}",
                f"eval.max_samples={eval_samples}",
            ],
        )
        outcome = job.run()
        lines = [json.loads(line) for line in (job.run_dir / "metrics.jsonl").read_text().splitlines()]
        last = [line for line in lines if line.get("stage") == "distill"][-1]
        results[name] = {
            "steps": steps,
            "seconds": round(time.perf_counter() - started, 1),
            "final_train_loss": round(last["train/loss"], 4),
            "align_ratio": round(last["train/align_ratio"], 3) if "train/align_ratio" in last else None,
            "student": {k: outcome["student"].get(k) for k in ("rougeL", "teacher_agreement", "teacher_kl")},
            "student_init": {k: outcome["student_init"].get(k) for k in ("rougeL", "teacher_agreement", "teacher_kl")},
        }
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1024, help="training samples (the first N of the split)")
    parser.add_argument("--teacher-steps", type=int, default=200, help="teacher_sft steps (0: random-init teacher)")
    parser.add_argument("--fidelity-samples", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="distillation steps of each step-time run")
    parser.add_argument("--server-threads", type=int, default=1)
    parser.add_argument("--student-steps", type=int, default=100)
    parser.add_argument("--eval-samples", type=int, default=50)
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "bench_teacher_store.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dskd-bench-store-") as tmp:
        bench = Bench(Path(tmp), args.samples)
        teacher = train_teacher(bench, args.teacher_steps)
        quality = bytes_and_fidelity(bench, teacher, args.fidelity_samples)
        store = build(bench, "store-main", teacher, [])  # the float32 CPU teacher's hidden states, bf16
        steps = step_times(bench, teacher, store, args.steps, args.server_threads)
        steps["signal_per_batch"] = signal_times(bench, teacher, store)
        students = three_students(bench, store, args.student_steps, args.eval_samples)
    result = {
        "benchmark": "teacher_store",
        "teacher": "default job's teacher-llama (d=256, 4 layers, Mistral tokenizer), "
        + (f"teacher_sft {args.teacher_steps} steps" if args.teacher_steps else "random init"),
        "samples": args.samples,
        "bytes_per_token": quality["bytes"],
        "distillkit_bytes_per_token_k128": 300,
        "fidelity": quality["fidelity"],
        "step_time": steps,
        "students": students,
        "seconds": round(time.perf_counter() - started, 1),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
    }
    text = json.dumps(result)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
