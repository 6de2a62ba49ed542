"""A small-scale reproduction of the DSKD papers' comparison on the bundled tasks.

The same student (the default job's GPT-2-tokenizer student) is distilled with each method for the same
steps and seeds, and evaluated on the test split (ROUGE-L, exact match) and on held-out text (top-1 agreement
with its teacher). Two teachers are trained once, by supervised fine-tuning on the training split: one
sharing the student's GPT-2 tokenizer (for the same-vocabulary methods) and one with the Mistral tokenizer
(for the cross-tokenizer methods), both with the default job's teacher architecture.

Methods: sft (no teacher), kd, dskd, dskd_v2 (same-vocabulary teacher); dskd_v2_eta, mined_kd, uld, and
dskd_v2_eta_on_policy (different-tokenizer teacher). Nothing is tuned per method: every run uses the default
job's [train], [objective] and [divergence] settings, changing only what the method is.

    python benchmarks/reproduce.py            # 3 seeds, about an hour on 2 CPU cores
    python benchmarks/reproduce.py --quick    # 1 seed, fewer steps, about 10 minutes

Prints one JSON object {"methods": {name: {"rougeL", "exact_match", "teacher_agreement"}}, "teacher": {...},
"seeds": [...], ...}, each metric as {"mean", "std", "per_seed"}; the table goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from dskd.config import load_config  # noqa: E402
from dskd.console import Console  # noqa: E402
from dskd.evaluation.stage import evaluate_stage  # noqa: E402
from dskd.registry import load_registry  # noqa: E402
from dskd.run.job import Job  # noqa: E402

SAME, CROSS = "same_vocab", "cross_vocab"
TEACHERS = {
    SAME: {"tokenizer": "examples/tokenizers/gpt2", "vocab_size": 50257, "bos": 50256, "eos": 50256},
    CROSS: {"tokenizer": "examples/tokenizers/mistral", "vocab_size": 32000, "bos": 1, "eos": 2},
}
METHODS: dict[str, tuple[str, list[str]]] = {
    "sft": (SAME, ["objective.name=sft"]),
    "kd": (SAME, ["objective.name=kd"]),
    "dskd": (SAME, ["objective.name=dskd"]),
    "dskd_v2": (SAME, ["objective.name=dskd_v2"]),
    "dskd_v2_eta": (CROSS, ["objective.name=dskd_v2", "aligner.name=eta"]),
    "mined_kd": (CROSS, ["objective.name=mined_kd", 'aligner.name=""']),
    "uld": (CROSS, ["objective.name=uld", 'aligner.name=""']),
    "dskd_v2_eta_on_policy": (
        CROSS,
        ["objective.name=dskd_v2", "aligner.name=eta", "policy.name=on_policy", "policy.max_new_tokens=16"],
    ),
}
METRICS = ("rougeL", "exact_match", "teacher_agreement")


def teacher_config(out: Path, kind: str) -> Path:
    spec = TEACHERS[kind]
    config = json.loads((REPO / "examples/models/teacher-llama/config.json").read_text())
    config.update(vocab_size=spec["vocab_size"], bos_token_id=spec["bos"], eos_token_id=spec["eos"])
    folder = out / "teacher-configs" / kind
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def make_job(registry, overrides: list[str], console: Console) -> Job:
    job = Job(load_config(REPO / "dskd.toml", overrides, registry=registry), registry)
    job.console = console  # progress and tables to stderr: stdout carries the JSON only
    return job


def train_teacher(registry, out: Path, kind: str, args, console: Console) -> tuple[Path, dict]:
    run = out / f"teacher-{kind}"
    overrides = [
        f"run.output_dir={run}",
        'run.stages=["teacher_sft"]',
        f"teacher.config={teacher_config(out, kind)}",
        f"teacher.tokenizer={REPO / TEACHERS[kind]['tokenizer']}",
        f"teacher_sft.steps={args.teacher_steps}",
        f"data.cache_dir={out / 'cache'}",
        f"eval.max_samples={args.eval_samples}",
    ]
    job = make_job(registry, overrides, console)
    job.resume = (run / "teacher" / "config.json").exists()  # a finished teacher is reused on a rerun
    job.prepare_run_dir()
    path = job.teacher_sft()
    metrics = evaluate_stage(job, path, None, include=("teacher",))["teacher"]
    return path, {k: metrics[k] for k in ("exact_match", "rougeL")}


def distill(registry, out: Path, method: str, seed: int, teacher: Path, args, console: Console) -> dict:
    kind, extra = METHODS[method]
    run = out / "runs" / f"{method}-seed{seed}"
    overrides = [
        f"run.output_dir={run}",
        'run.stages=["distill"]',
        f"run.seed={seed}",
        f"teacher.model={teacher}",
        'teacher.tokenizer=""',
        'teacher.config=""',
        f"train.max_steps={args.steps}",
        f"data.cache_dir={out / 'cache'}",
        f"eval.max_samples={args.eval_samples}",
        f"run.log_every={max(args.steps // 4, 1)}",
        *extra,
    ]
    job = make_job(registry, overrides, console)
    job.resume = run.exists()  # an interrupted reproduction continues where it stopped
    job.prepare_run_dir()
    final = run / "final"
    if not (final / "config.json").exists():
        final = job.distill(teacher)
    metrics = evaluate_stage(job, teacher, final, include=("student",))["student"]
    return {k: metrics[k] for k in METRICS}


def summary(values: list[float]) -> dict:
    return {
        "mean": round(statistics.fmean(values), 2),
        "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
        "per_seed": [round(v, 2) for v in values],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="one seed, fewer steps and test prompts (about 10 minutes)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "reproduce")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the methods")
    args = parser.parse_args()
    args.seeds = [0] if args.quick else [0, 1, 2]
    args.steps = 120 if args.quick else 250
    args.teacher_steps = 300 if args.quick else 400
    args.eval_samples = 100 if args.quick else 200
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        print(f"reproduce: unknown methods {unknown}; known: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    args.out = args.out / ("quick" if args.quick else "full")
    console = Console(stderr=True)
    registry = load_registry()
    started = time.perf_counter()
    teachers, teacher_metrics = {}, {}
    for kind in sorted({METHODS[m][0] for m in methods}):
        teachers[kind], teacher_metrics[kind] = train_teacher(registry, args.out, kind, args, console)
    results: dict[str, dict[str, list[float]]] = {m: {k: [] for k in METRICS} for m in methods}
    for seed in args.seeds:
        for method in methods:
            metrics = distill(registry, args.out, method, seed, teachers[METHODS[method][0]], args, console)
            for key in METRICS:
                results[method][key].append(metrics[key])
    report = {
        "methods": {m: {k: summary(v) for k, v in results[m].items()} for m in methods},
        "teacher": teacher_metrics,
        "seeds": args.seeds,
        "steps": args.steps,
        "teacher_steps": args.teacher_steps,
        "eval_samples": args.eval_samples,
        "quick": args.quick,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    rows = [
        [
            m,
            *(f"{report['methods'][m][k]['mean']:.2f} ± {report['methods'][m][k]['std']:.2f}" for k in METRICS),
            METHODS[m][0],
        ]
        for m in methods
    ]
    console.table(
        f"reproduction ({len(args.seeds)} seed(s), {args.steps} steps)",
        ["method", "ROUGE-L", "exact match", "agreement %", "teacher"],
        rows,
    )
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
