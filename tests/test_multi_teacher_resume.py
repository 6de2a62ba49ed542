"""Two teachers, killed with SIGKILL mid-run, resume to the bit-identical student and per-teacher projectors of an
uninterrupted run (issue 18's target: checkpoint/resume bit-exact with two teachers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from multi_teacher_job import two_teachers, write_multi_job

from dskd.run import checkpoint

STEPS = 8
SAVE_EVERY = 2
WAIT = 600.0


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}


def _command(job: Path, *extra: str) -> list[str]:
    sets = [f"train.max_steps={STEPS}", f"train.save_every={SAVE_EVERY}", "run.deterministic=true"]
    return [sys.executable, "-m", "dskd", "run", str(job), *(a for s in sets for a in ("--set", s)), *extra]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=WAIT, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _job(folder: Path) -> Path:
    # The mixed case: mistral serves every sample (weight 1), tinyllama the lists (weight 2).
    teachers = two_teachers(routed=False, weights=(1.0, 2.0))
    teachers[1]["route"] = {"category": ["list/*"]}
    return write_multi_job(folder, teachers, samples=24)


def _final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    weights = AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float32).state_dict()
    last = checkpoint.latest(run_dir / "checkpoints" / "distill")
    projectors = {f"objective.{k}": v for k, v in last.load("objective").items()}
    return {**weights, **projectors}


@pytest.mark.integration
def test_a_two_teacher_run_killed_with_sigkill_resumes_bit_exactly(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    _run(_command(_job(straight)), straight)

    job = _job(crashed)
    root = crashed / "run" / "checkpoints" / "distill"
    log = (crashed / "first-attempt.log").open("w")
    process = subprocess.Popen(_command(job), cwd=crashed, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + WAIT
    while not checkpoint.checkpoints(root) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    alive = process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait(60)
    log.close()
    assert alive, (
        f"the first attempt ended before it was killed:\n{(crashed / 'first-attempt.log').read_text()[-3000:]}"
    )
    assert not (crashed / "run" / "final").exists()

    resumed = _run(_command(job, "--resume"), crashed)
    assert "resumed from step-" in resumed.stdout
    expected, got = _final_state(straight / "run"), _final_state(crashed / "run")
    assert {k.split(".")[1] for k in expected if k.startswith("objective.")} == {"mistral", "tinyllama"}
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name  # bit for bit
    lines = [json.loads(line) for line in (crashed / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, STEPS + 1))
    assert all("train/align_ratio/tinyllama" in r or "train/kd_teacher_space/mistral" in r for r in lines)


def _sft_job(folder: Path) -> Path:
    path = write_multi_job(folder, two_teachers(), samples=24, stages=("teacher_sft", "distill"))
    path.write_text(path.read_text() + "\n[teacher_sft]\nsteps = 6\nbatch_size = 4\n")
    return path


def _teacher_weights(run_dir: Path, name: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run_dir / "teachers" / name, dtype=torch.float32).state_dict()


@pytest.mark.integration
def test_teacher_sft_killed_during_the_second_teacher_resumes_it_and_keeps_the_first(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    _run(_command(_sft_job(straight)), straight)

    job = _sft_job(crashed)
    root = crashed / "run" / "checkpoints" / "teacher_sft-tinyllama"
    log = (crashed / "first-attempt.log").open("w")
    process = subprocess.Popen(_command(job), cwd=crashed, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + WAIT
    while not checkpoint.checkpoints(root) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    alive = process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait(60)
    log.close()
    assert alive, (
        f"the first attempt ended before it was killed:\n{(crashed / 'first-attempt.log').read_text()[-3000:]}"
    )
    assert (crashed / "run" / "teachers" / "mistral" / "config.json").exists()
    assert not (crashed / "run" / "teachers" / "tinyllama").exists()

    resumed = _run(_command(job, "--resume"), crashed)
    assert "reusing the trained teacher 'mistral'" in resumed.stdout.replace("\n", " ")
    assert "resumed from step-" in resumed.stdout
    for name in ("mistral", "tinyllama"):
        expected, got = _teacher_weights(straight / "run", name), _teacher_weights(crashed / "run", name)
        for key in expected:
            assert torch.equal(expected[key], got[key]), (name, key)
    expected, got = _final_state(straight / "run"), _final_state(crashed / "run")
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
