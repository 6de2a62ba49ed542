"""What a second teacher costs a training step (issue 18): two teachers against one, local and remote.

The job is examples/multi_teacher.toml's: the GPT-2-tokenizer student, dskd_v2 with each teacher's eta aligner,
and its two teachers' architecture (the default job's tiny Llama, random weights, one with the Mistral and one with
the TinyLlama tokenizer, saved to a temporary folder). Every sample goes to every teacher (no routes, equal
weights), so each teacher scores the whole micro-batch, as a single teacher would. Each run trains the student with
the real engine for the same steps, seed and batches; every step is timed, and so is the wait for each teacher's
signal within it (the engine's fetcher), so a step splits into its teacher part and its student part (forward,
backward and optimizer step) in the same run. The first `--warmup` steps are left out of the means.

(a) local: the step time with both teachers in process against the sum of the two single-teacher steps' teacher
    parts plus one student part (the mean of the two single-teacher runs'): ratio <= 1.0 means the student's work is
    shared, not paid per teacher (target).
(b) remote: each teacher behind its own `servers/serve_teacher.py` process on loopback (as bench_remote_teacher
    starts them); the teacher wait per step with both against the wait with one (the mean of the two single-teacher
    runs'): ratio <= 1.2 means the two are asked at once and compute side by side (target).

    python benchmarks/bench_multi_teacher.py [--steps 30] [--warmup 5] [--server-threads 1]

Prints one JSON object (also written to benchmarks/results/bench_multi_teacher.json with --write).
"""

from __future__ import annotations

import os

# Teacher servers and the trainer share the cores: passive OpenMP waiting lets the other processes' threads run
# (set before torch loads OpenMP; the servers inherit it), as bench_remote_teacher does.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the server harness the tests use

from teacher_server_harness import start_servers, stop_servers  # noqa: E402

from dskd.config import ConfigError, apply_overrides, parse_config, read_toml  # noqa: E402
from dskd.console import Console  # noqa: E402
from dskd.registry import load_registry  # noqa: E402
from dskd.run import teachers as multi_teachers  # noqa: E402
from dskd.run.engine import Trainer  # noqa: E402
from dskd.run.job import Job  # noqa: E402

JOB = REPO / "examples" / "multi_teacher.toml"
RESULT = REPO / "benchmarks" / "results" / "bench_multi_teacher.json"


def save_teachers(root: Path) -> dict[str, Path]:
    """The example's teachers with random weights (seeded), each saved with its tokenizer like any HF model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = {}
    for i, entry in enumerate(read_toml(JOB)["teachers"]):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(JOB.parent / entry["config"]))
        folder = root / "teachers" / entry["name"]
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(JOB.parent / entry["tokenizer"]).save_pretrained(folder)
        out[entry["name"]] = folder
    return out


class StepClock:
    """Times every training step and, within it, the wait for each teacher's signal (the fetcher's `waits`)."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.waits: list[dict[str, float]] = []
        self.original = Trainer.train_step

    def __enter__(self) -> StepClock:
        clock = self

        def timed(trainer, window, meter):
            start = time.perf_counter()
            clock.original(trainer, window, meter)
            clock.steps.append(time.perf_counter() - start)
            clock.waits.append(dict(getattr(trainer.fetcher, "waits", {})))

        Trainer.train_step = timed
        return self

    def __exit__(self, *exc) -> None:
        Trainer.train_step = self.original


def train(root: Path, name: str, entries: list[dict], args) -> dict:
    """Distill for `args.steps` steps with these [[teachers]] entries; the per-step means after the warm-up."""
    registry = load_registry()
    raw = read_toml(JOB)
    raw["teachers"] = entries
    problems = apply_overrides(
        raw,
        [
            f"run.output_dir={root / 'runs' / name}",
            'run.stages=["distill"]',
            f"train.max_steps={args.steps + args.warmup}",
            f"train.warmup_steps={args.warmup}",
            f"run.log_every={args.steps + args.warmup}",
            f"data.cache_dir={root / 'cache'}",
        ],
    )
    if problems:
        raise ConfigError(problems, source=str(JOB))
    job = Job(parse_config(raw, source=str(JOB), base_dir=JOB.parent, registry=registry), registry)
    job.console = Console(stderr=True)  # stdout carries the JSON only
    job.prepare_run_dir()
    with StepClock() as clock:
        multi_teachers.distill(job, {})
    steps, waits = clock.steps[args.warmup :], clock.waits[args.warmup :]
    names = [e["name"] for e in entries]
    per_teacher = {n: statistics.fmean(w.get(n, 0.0) for w in waits) for n in names}
    teacher = sum(per_teacher.values())
    step = statistics.fmean(steps)
    return {
        "step_s": round(step, 4),
        "teacher_s": round(teacher, 4),
        "student_s": round(step - teacher, 4),
        "teacher_s_per_teacher": {n: round(v, 4) for n, v in per_teacher.items()},
        "step_s_stdev": round(statistics.stdev(steps), 4) if len(steps) > 1 else 0.0,
    }


def compare(root: Path, kind: str, entries: dict[str, dict], args) -> dict:
    """Each teacher alone, then both; the same steps, seed and batches (every sample to every teacher)."""
    runs = {f"single_{n}": train(root, f"{kind}-single-{n}", [e], args) for n, e in entries.items()}
    runs["both"] = train(root, f"{kind}-both", list(entries.values()), args)
    return runs


def local_row(root: Path, saved: dict[str, Path], args) -> dict:
    entries = {n: {"name": n, "model": str(p)} for n, p in saved.items()}
    runs = compare(root, "local", entries, args)
    singles = [runs[f"single_{n}"] for n in saved]
    budget = sum(r["teacher_s"] for r in singles) + statistics.fmean(r["student_s"] for r in singles)
    return {
        "runs": runs,
        "sum_of_teacher_parts_plus_one_student_part_s": round(budget, 4),
        "ratio": round(runs["both"]["step_s"] / budget, 3),
        "target": "<= 1.0",
    }


def remote_row(root: Path, saved: dict[str, Path], args) -> dict:
    servers = start_servers([(p, (), n) for n, p in saved.items()], root / "servers", threads=args.server_threads)
    try:
        entries = {
            n: {"name": n, "address": [s.address], "cache_dir": str(root / "client-cache")}
            for n, s in zip(saved, servers)
        }
        runs = compare(root, "remote", entries, args)
    finally:
        stop_servers(servers)
    one = statistics.fmean(runs[f"single_{n}"]["teacher_s"] for n in saved)
    return {
        "runs": runs,
        "server_threads": args.server_threads,
        "one_teacher_wait_s": round(one, 4),
        "two_teachers_wait_s": runs["both"]["teacher_s"],
        "ratio": round(runs["both"]["teacher_s"] / max(one, 1e-9), 3),
        "target": "<= 1.2",
        "step_ratio_both_vs_one": round(
            runs["both"]["step_s"] / statistics.fmean(runs[f"single_{n}"]["step_s"] for n in saved), 3
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the means")
    parser.add_argument("--server-threads", type=int, default=1, help="torch threads of each teacher server")
    parser.add_argument("--rows", default="local,remote", help="comma-separated: local, remote")
    parser.add_argument("--write", action="store_true", help=f"also write the JSON to {RESULT.relative_to(REPO)}")
    args = parser.parse_args()
    rows = {r.strip() for r in args.rows.split(",") if r.strip()}
    load_start = os.getloadavg()
    started = time.perf_counter()
    result: dict = {"benchmark": "multi_teacher", "job": str(JOB.relative_to(REPO)), "objective": "dskd_v2+eta"}
    with tempfile.TemporaryDirectory(prefix="dskd-bench-multi-") as tmp:
        root = Path(tmp)
        saved = save_teachers(root)
        result["teachers"] = {n: f"{read_toml(JOB)['teachers'][i]['tokenizer']}" for i, n in enumerate(saved)}
        if "local" in rows:
            result["local"] = local_row(root, saved, args)
        if "remote" in rows:
            result["remote"] = remote_row(root, saved, args)
    result.update(
        steps=args.steps,
        warmup=args.warmup,
        batch_size=read_toml(JOB)["train"]["batch_size"],
        elapsed_s=round(time.perf_counter() - started, 1),
        loadavg_start=[round(x, 2) for x in load_start],
        loadavg_end=[round(x, 2) for x in os.getloadavg()],
        machine={"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
    )
    text = json.dumps(result)
    if args.write:
        RESULT.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
