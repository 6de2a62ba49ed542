"""What a second teacher costs a training step (issue 18): two teachers against one, local and remote.

The job is examples/multi_teacher.toml's: the GPT-2-tokenizer student, dskd_v2 with each teacher's eta aligner,
and its two teachers' architecture (the default job's tiny Llama, random weights, one with the Mistral and one with
the TinyLlama tokenizer, saved to a temporary folder). Every sample goes to every teacher (no routes, equal
weights), so each teacher scores the whole micro-batch, as a single teacher would. Each run trains the student with
the real engine for the same steps, seed and batches, and every step is timed in parts in the run itself
(`StepClock`): the wait for each teacher's signal (`teacher_forward_s`: a local teacher computes inside it), the
distillation objective's forward and backward down to the student's hidden state, and the student's own forward,
backward and the rest of the step. A step's teacher part is its teachers' forwards plus the objective; its student
part is the rest. The first `--warmup` steps are left out of the means.

(a) local: the step time with both teachers in process against the sum of the two single-teacher steps' teacher
    parts plus one student part (the mean of the two single-teacher runs'): `ratio` <= 1.0 means the student's
    forward and backward are paid once, not per teacher (target). Each single run's objective includes the gold CE
    through the student's head, which the two-teacher step computes once. `ratio_teacher_forward_only` counts only
    the teachers' forwards as their parts (the objective then goes to the student part).
(b) remote: each teacher behind its own `servers/serve_teacher.py` process on loopback (as bench_remote_teacher
    starts them, `--server-threads` torch threads each); the teacher wait per step with both against the wait with
    one (the mean of the two single-teacher runs'), with the engine's cross-step prefetch off, so every step waits
    for the servers' whole latency: `wait_ratio` <= 1.2 means the two are asked at once and compute side by side
    (target). The same with prefetch on (the engine as it trains) is reported beside it.

    python benchmarks/bench_multi_teacher.py [--steps 20] [--warmup 3] [--server-threads 1]

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
from dskd.run import engine  # noqa: E402
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
    """Times every training step and its parts, in the run itself: the wait for each teacher's signal (the fetcher's
    `waits`; a local teacher's forward runs inside it), the student's forward to its last hidden state, the objective's
    forward (`compute`, the KD and CE terms through the LM heads), the backward split at the student's hidden state (a
    gradient hook: before it, the objective's backward; after it, the student's) and the rest (optimizer step, ...).
    With `prefetch=False` the engine's cross-step prefetch is off, so a remote teacher's whole latency is waited for."""

    def __init__(self, prefetch: bool = True) -> None:
        self.prefetch = prefetch
        self.records: list[dict] = []
        self.original_step = Trainer.train_step
        self.original_hidden = engine.last_hidden_state

    def __enter__(self) -> StepClock:
        clock = self

        def hidden(model, *args, **kwargs):
            start = time.perf_counter()
            out = clock.original_hidden(model, *args, **kwargs)
            clock.now["student_forward_s"] += time.perf_counter() - start
            if out.requires_grad:
                out.register_hook(lambda grad: clock.now.__setitem__("hidden_grad_at", time.perf_counter()))
            return out

        def step(trainer, window, meter):
            if not getattr(trainer, "_bench_wrapped", False):
                trainer._bench_wrapped = True
                trainer._can_prefetch = trainer._can_prefetch and clock.prefetch
                _wrap_backward(trainer.accelerator, clock)
                _wrap_compute(trainer.spec.objective, clock)
            clock.now = {
                "student_forward_s": 0.0,
                "objective_forward_s": 0.0,
                "backward_s": 0.0,
                "student_backward_s": 0.0,
            }
            start = time.perf_counter()
            clock.original_step(trainer, window, meter)
            clock.now["step_s"] = time.perf_counter() - start
            clock.now["teacher_forward_s"] = dict(getattr(trainer.fetcher, "waits", {}))
            clock.records.append(clock.now)

        Trainer.train_step = step
        engine.last_hidden_state = hidden
        return self

    def __exit__(self, *exc) -> None:
        Trainer.train_step = self.original_step
        engine.last_hidden_state = self.original_hidden


def _wrap_backward(accelerator, clock: StepClock) -> None:
    backward = accelerator.backward

    def timed(loss, **kwargs):
        clock.now["hidden_grad_at"] = None
        start = time.perf_counter()
        backward(loss, **kwargs)
        end = time.perf_counter()
        clock.now["backward_s"] += end - start
        if clock.now["hidden_grad_at"] is not None:
            clock.now["student_backward_s"] += end - clock.now["hidden_grad_at"]

    accelerator.backward = timed


def _wrap_compute(objective, clock: StepClock) -> None:
    compute = objective.compute

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = compute(*args, **kwargs)
        clock.now["objective_forward_s"] += time.perf_counter() - start
        return out

    objective.compute = timed


def train(root: Path, name: str, entries: list[dict], args, *, prefetch: bool = True) -> dict:
    """Distill for `args.steps` steps with these [[teachers]] entries; the per-step means of each part after the
    warm-up. The teacher part of a step: its teachers' forwards (the waits) and the distillation objective (forward
    and backward, down to the student's hidden state); the student part: the student's forward and backward and the
    rest of the step (optimizer, gradient clipping, moving the batch)."""
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
    with StepClock(prefetch) as clock:
        multi_teachers.distill(job, {})
    records = clock.records[args.warmup :]
    names = [e["name"] for e in entries]

    def mean(key: str) -> float:
        return statistics.fmean(r[key] for r in records)

    waits = {n: statistics.fmean(r["teacher_forward_s"].get(n, 0.0) for r in records) for n in names}
    step, teacher_forward = mean("step_s"), sum(waits.values())
    objective = mean("objective_forward_s") + mean("backward_s") - mean("student_backward_s")
    student = step - teacher_forward - objective
    return {
        "step_s": round(step, 4),
        "teacher_part_s": round(teacher_forward + objective, 4),
        "student_part_s": round(student, 4),
        "teacher_forward_s": round(teacher_forward, 4),
        "teacher_forward_s_per_teacher": {n: round(v, 4) for n, v in waits.items()},
        "objective_forward_backward_s": round(objective, 4),
        "student_forward_s": round(mean("student_forward_s"), 4),
        "student_backward_s": round(mean("student_backward_s"), 4),
        "step_s_stdev": round(statistics.stdev(r["step_s"] for r in records), 4) if len(records) > 1 else 0.0,
    }


def compare(root: Path, kind: str, entries: dict[str, dict], args, **kwargs) -> dict:
    """Each teacher alone, then both; the same steps, seed and batches (every sample to every teacher)."""
    runs = {f"single_{n}": train(root, f"{kind}-single-{n}", [e], args, **kwargs) for n, e in entries.items()}
    runs["both"] = train(root, f"{kind}-both", list(entries.values()), args, **kwargs)
    return runs


def local_row(root: Path, saved: dict[str, Path], args) -> dict:
    entries = {n: {"name": n, "model": str(p)} for n, p in saved.items()}
    runs = compare(root, "local", entries, args)
    singles = [runs[f"single_{n}"] for n in saved]
    budget = sum(r["teacher_part_s"] for r in singles) + statistics.fmean(r["student_part_s"] for r in singles)
    # The same with only the teachers' forwards as their parts (the objective's work counted as the student's).
    forwards = sum(r["teacher_forward_s"] for r in singles)
    forward_budget = forwards + statistics.fmean(r["step_s"] - r["teacher_forward_s"] for r in singles)
    return {
        "runs": runs,
        "sum_of_teacher_parts_plus_one_student_part_s": round(budget, 4),
        "ratio": round(runs["both"]["step_s"] / budget, 3),
        "target": "<= 1.0",
        "ratio_teacher_forward_only": round(runs["both"]["step_s"] / forward_budget, 3),
    }


def remote_row(root: Path, saved: dict[str, Path], args) -> dict:
    """Without the engine's cross-step prefetch (every step waits for the servers' whole latency, which is what
    the target compares) and with it (the engine as it trains: the signal of the next step is asked for during this
    one)."""
    servers = start_servers([(p, (), n) for n, p in saved.items()], root / "servers", threads=args.server_threads)
    out: dict = {"server_threads": args.server_threads}
    try:
        entries = {
            n: {"name": n, "address": [s.address], "cache_dir": str(root / "client-cache")}
            for n, s in zip(saved, servers)
        }
        for label, prefetch in (("no_prefetch", False), ("prefetch", True)):
            runs = compare(root, f"remote-{label}", entries, args, prefetch=prefetch)
            one = statistics.fmean(runs[f"single_{n}"]["teacher_forward_s"] for n in saved)
            out[label] = {
                "runs": runs,
                "one_teacher_wait_s": round(one, 4),
                "two_teachers_wait_s": runs["both"]["teacher_forward_s"],
                "wait_ratio": round(runs["both"]["teacher_forward_s"] / one, 3) if one > 1e-3 else None,
                "step_ratio_both_vs_one": round(
                    runs["both"]["step_s"] / statistics.fmean(runs[f"single_{n}"]["step_s"] for n in saved), 3
                ),
            }
    finally:
        stop_servers(servers)
    out["ratio"] = out["no_prefetch"]["wait_ratio"]
    out["target"] = "<= 1.2 (no_prefetch wait_ratio)"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the means")
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
