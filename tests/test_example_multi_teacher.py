"""examples/multi_teacher.toml (issue 18): it validates, its two teachers split the task families into halves of
about the same size with every training sample served by exactly one, and it runs end to end for a few steps."""

from __future__ import annotations

import fnmatch
import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "examples" / "multi_teacher.toml"


def _dskd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dskd", *args], capture_output=True, text=True, timeout=1200, cwd=REPO)


def test_the_example_validates():
    done = _dskd("validate", str(JOB))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{JOB}: ok"


def test_each_training_sample_goes_to_one_teacher_and_the_halves_are_about_even():
    entries = tomllib.loads(JOB.read_text())["teachers"]
    assert [e["tokenizer"] for e in entries] == ["tokenizers/mistral", "tokenizers/tinyllama"]
    routes = {
        e["name"]: [e["route"]["category"]] if isinstance(e["route"]["category"], str) else e["route"]["category"]
        for e in entries
    }
    counts = dict.fromkeys(routes, 0)
    for line in (REPO / "examples" / "data" / "tasks" / "train.jsonl").read_text().splitlines():
        category = json.loads(line)["category"]
        serving = [n for n, patterns in routes.items() if any(fnmatch.fnmatchcase(category, p) for p in patterns)]
        assert len(serving) == 1, (category, serving)
        counts[serving[0]] += 1
    assert sum(counts.values()) == 4000
    assert min(counts.values()) / max(counts.values()) > 0.95, counts


@pytest.mark.slow
def test_the_example_runs_a_few_steps_of_every_stage(tmp_path):
    run = tmp_path / "run"
    done = _dskd(
        "run", str(JOB),
        "--set", f"run.output_dir={run}", "--set", "teacher_sft.steps=2", "--set", "train.max_steps=2",
        "--set", "train.warmup_steps=1", "--set", "teacher_sft.warmup_steps=1", "--set", "eval.max_samples=8",
        "--set", "run.log_every=1", "--set", "eval.max_new_tokens=4",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert {"teacher/lists", "teacher/numbers_words", "student_init", "student"} == set(results)
    for name in ("lists", "numbers_words"):
        assert (run / "teachers" / name / "config.json").is_file()
        assert 0 <= results["student"][f"teacher_agreement/{name}"] <= 100
        assert results["student"][f"teacher_kl/{name}"] >= 0
    stages = {json.loads(line)["stage"] for line in (run / "metrics.jsonl").read_text().splitlines()}
    assert stages == {"teacher_sft-lists", "teacher_sft-numbers_words", "distill", "eval"}
