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

Several teachers (`--multi-teacher`, issue 18): the two specialist teachers of examples/multi_teacher.toml (a
Mistral-tokenizer teacher fine-tuned on the list tasks, a TinyLlama-tokenizer one on the arithmetic, string and
conversion tasks) are trained once by its teacher_sft stage, each on its half, and reused by every row. The same
student (that job's, with its [train] settings) is then distilled for the same steps and seeds from:

- `single_<name>`: that teacher alone, on all the training data;
- `routed`: both, each sample to the teacher of its category (the example as written);
- `weighted`: both on every sample, equal weights.

Every row goes through the same [[teachers]] code path (a single row is a job with one entry) and is evaluated the
same way: ROUGE-L and exact match on the test split, on each teacher's half of it (`exact_match/<name>`), and top-1
agreement with each teacher on the held-out samples that teacher serves (`teacher_agreement/<name>`).

    python benchmarks/reproduce.py --multi-teacher [--quick] [--steps N] [--teacher-steps N] [--eval-samples N]
        [--teachers-from RUN]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from dskd.config import ConfigError, apply_overrides, load_config, parse_config, read_toml  # noqa: E402
from dskd.console import Console  # noqa: E402
from dskd.evaluation.stage import evaluate_stage  # noqa: E402
from dskd.registry import load_registry  # noqa: E402
from dskd.run import teachers as multi_teachers  # noqa: E402
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


# -- several teachers ---------------------------------------------------------------------------------------------
MULTI_TEACHER_JOB = REPO / "examples" / "multi_teacher.toml"


def multi_teacher_rows() -> list[str]:
    names = [entry["name"] for entry in read_toml(MULTI_TEACHER_JOB)["teachers"]]
    return [f"single_{name}" for name in names] + ["routed", "weighted"]


def multi_teacher_config(registry, overrides: list[str], row: str = "", trained: dict[str, Path] | None = None):
    """examples/multi_teacher.toml with `overrides`; with `row`, its [[teachers]] entries become that row's: the
    `trained` teachers' folders in place of their configs, routed (`routed`), on every sample with equal weights
    (`weighted`), or one teacher alone on every sample (`single_<name>`)."""
    raw = read_toml(MULTI_TEACHER_JOB)
    if row:
        entries = []
        for entry in raw["teachers"]:
            own = {k: v for k, v in entry.items() if k not in ("config", "tokenizer", "route", "weight")}
            own["model"] = str(trained[entry["name"]])  # its tokenizer is saved beside it
            if row == "routed":
                entries.append({**own, "route": entry["route"]})
            elif row == "weighted" or row == f"single_{entry['name']}":
                entries.append({**own, "weight": 1.0})
        raw["teachers"] = entries
    problems = apply_overrides(raw, overrides)
    if problems:
        raise ConfigError(problems, source=str(MULTI_TEACHER_JOB))
    return parse_config(raw, source=str(MULTI_TEACHER_JOB), base_dir=MULTI_TEACHER_JOB.parent, registry=registry)


def train_multi_teachers(registry, out: Path, args, console: Console) -> tuple[dict[str, Path], dict]:
    """The example's teachers, each fine-tuned on its half once, and their scores on their halves of the test split."""
    run = out / "teachers"
    overrides = [
        f"run.output_dir={run}",
        'run.stages=["teacher_sft"]',
        f"teacher_sft.steps={args.teacher_steps}",
        f"data.cache_dir={out / 'cache'}",
        f"eval.max_samples={args.eval_samples}",
    ]
    job = Job(multi_teacher_config(registry, overrides), registry)
    job.console = console
    if args.teachers_from:  # the teachers of a finished `dskd run examples/multi_teacher.toml`, copied once
        for entry in job.config.teachers:
            target = run / multi_teachers.TEACHERS_DIR / entry.name
            if not (target / "config.json").exists():
                shutil.copytree(Path(args.teachers_from) / multi_teachers.TEACHERS_DIR / entry.name, target)
    job.resume = run.exists()  # finished teachers are reused on a rerun
    job.prepare_run_dir()
    trained = multi_teachers.teacher_sft(job)
    results = evaluate_stage(job, trained, None, include=("teacher",))
    return trained, {row: {k: results[row][k] for k in ("exact_match", "rougeL", "num_examples")} for row in results}


def distill_multi(registry, out: Path, row: str, seed: int, trained: dict[str, Path], args, console: Console) -> dict:
    run = out / "runs" / f"{row}-seed{seed}"
    common = [f"data.cache_dir={out / 'cache'}", f"eval.max_samples={args.eval_samples}", f"run.output_dir={run}"]
    overrides = [
        'run.stages=["distill"]',
        f"run.seed={seed}",
        f"train.max_steps={args.steps}",
        f"run.log_every={max(args.steps // 4, 1)}",
        *common,
    ]
    job = Job(multi_teacher_config(registry, overrides, row, trained), registry)
    job.console = console
    job.resume = run.exists()  # an interrupted reproduction continues where it stopped
    job.prepare_run_dir()
    final = run / "final"
    if not (final / "config.json").exists():
        final = multi_teachers.distill(job, {})
    # Every row is measured against both teachers, each on its own half: the routed job's evaluation.
    evaluation = Job(multi_teacher_config(registry, common, "routed", trained), registry)
    evaluation.console = console
    metrics = evaluate_stage(evaluation, {}, final, include=("student",))["student"]
    return {k: metrics[k] for k in args.metrics}


def reproduce_multi_teacher(args, console: Console) -> dict:
    registry = load_registry()
    out = args.out
    started = time.perf_counter()
    trained, teacher_metrics = train_multi_teachers(registry, out, args, console)
    names = list(trained)
    args.metrics = (
        "rougeL",
        "exact_match",
        *(f"exact_match/{n}" for n in names),
        *(f"teacher_agreement/{n}" for n in names),
        *(f"teacher_kl/{n}" for n in names),
    )
    rows = multi_teacher_rows()
    results: dict[str, dict[str, list[float]]] = {r: {k: [] for k in args.metrics} for r in rows}
    for seed in args.seeds:
        for row in rows:
            metrics = distill_multi(registry, out, row, seed, trained, args, console)
            for key in args.metrics:
                results[row][key].append(metrics[key])
        # The seeds so far, after each: a long reproduction that is stopped still leaves its finished seeds.
        report = _multi_teacher_report(results, rows, teacher_metrics, args, seed, started)
        (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    shown = ("rougeL", "exact_match", *(f"exact_match/{n}" for n in names), *(f"teacher_agreement/{n}" for n in names))
    console.table(
        f"several teachers ({len(args.seeds)} seed(s), {args.steps} steps; teachers {args.teacher_steps} steps each)",
        ["row", *shown],
        [
            [r, *(f"{report['rows'][r][k]['mean']:.2f} ± {report['rows'][r][k]['std']:.2f}" for k in shown)]
            for r in rows
        ],
    )
    return report


def _multi_teacher_report(results, rows, teacher_metrics, args, seed: int, started: float) -> dict:
    return {
        "rows": {r: {k: summary(v) for k, v in results[r].items()} for r in rows},
        "teachers": teacher_metrics,
        "job": str(MULTI_TEACHER_JOB.relative_to(REPO)),
        "teachers_trained_once": True,
        "teachers_from": args.teachers_from,
        "seeds": args.seeds[: args.seeds.index(seed) + 1],
        "steps": args.steps,
        "teacher_steps": args.teacher_steps,
        "eval_samples": args.eval_samples,
        "quick": args.quick,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }


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
    parser.add_argument(
        "--multi-teacher",
        action="store_true",
        help="the rows of examples/multi_teacher.toml instead of the methods: each single teacher, both routed, both weighted",
    )
    parser.add_argument("--steps", type=int, default=0, help="distillation steps (0: the preset's)")
    parser.add_argument("--teacher-steps", type=int, default=0, help="teacher fine-tuning steps (0: the preset's)")
    parser.add_argument("--eval-samples", type=int, default=0, help="test prompts scored (0: the preset's)")
    parser.add_argument(
        "--teachers-from",
        default="",
        help="--multi-teacher: reuse the teachers a finished `dskd run examples/multi_teacher.toml` trained (its "
        "run.output_dir) instead of training them; give --teacher-steps as that run's teacher_sft.steps",
    )
    args = parser.parse_args()
    args.seeds = [0] if args.quick else [0, 1, 2]
    args.steps = args.steps or (120 if args.quick else 250)
    args.teacher_steps = args.teacher_steps or (300 if args.quick else 400)
    args.eval_samples = args.eval_samples or (100 if args.quick else 200)
    if args.multi_teacher:
        args.out = args.out / "multi_teacher" / ("quick" if args.quick else "full")
        console = Console(stderr=True)
        print(json.dumps(reproduce_multi_teacher(args, console)))
        return 0
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
