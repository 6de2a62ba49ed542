"""`data.streaming` through the real `dskd run`: a run killed with SIGKILL resumes at its position in the stream
to the weights and losses of an uninterrupted run, and a stream that ends before `train.max_steps` stops with one
line after checkpointing, so that adding data and `--resume` loses no work (as tests/test_survive_resume.py does
for the in-memory order)."""

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
from tiny_job import TASKS, write_job

from dskd.run import checkpoint

STEPS = 12
WAIT = 600.0  # seconds: generous for a loaded 2-core machine
STREAMING = ["--set", "data.streaming=true", "--set", "data.num_workers=2", "--set", "run.deterministic=true"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}


def _command(job: Path, steps: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dskd",
        "run",
        str(job),
        "--set",
        f"train.max_steps={steps}",
        "--set",
        "train.save_every=2",
        *STREAMING,
        *extra,
    ]


def _run(cmd: list[str], cwd: Path, status: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=WAIT, check=False)
    assert done.returncode == status, (
        f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float32).state_dict()


def _assert_same_run(expected: Path, got: Path, steps: int) -> None:
    a, b = _weights(expected), _weights(got)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name  # bit for bit
    lines = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (expected, got)]
    assert [m["step"] for m in lines[1]] == list(range(1, steps + 1))  # each step logged once
    assert [m["train/loss"] for m in lines[1]] == [m["train/loss"] for m in lines[0]]  # the same data, in order


def _steps_on_disk(root: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in checkpoint.checkpoints(root)]


@pytest.mark.integration
def test_a_streaming_run_killed_with_sigkill_resumes_at_its_position_in_the_stream(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    _run(_command(write_job(straight, samples=48), STEPS), straight)

    job = write_job(crashed, samples=48)
    root = crashed / "run" / "checkpoints" / "distill"
    log = (crashed / "first-attempt.log").open("w")
    process = subprocess.Popen(_command(job, STEPS), cwd=crashed, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + WAIT
    while len(_steps_on_disk(root)) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    alive = process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait(60)
    log.close()
    assert alive, (
        f"the first attempt ended before it could be killed:\n{(crashed / 'first-attempt.log').read_text()[-3000:]}"
    )
    good = _steps_on_disk(root)[-1]
    assert 0 < good < STEPS
    position = torch.load(root / f"step-{good:08d}" / "data.pt", weights_only=False)
    assert position["kind"] == "stream" and position["batches"] == good  # one micro-batch per step

    resumed = _run(_command(job, STEPS, "--resume"), crashed)
    assert f"resumed from step-{good:08d}" in resumed.stdout
    _assert_same_run(straight / "run", crashed / "run", STEPS)


@pytest.mark.integration
def test_a_stream_that_ends_early_is_checkpointed_and_continues_once_data_is_added(tmp_path):
    lines = TASKS.joinpath("train.jsonl").read_text().splitlines()[:40]
    straight = tmp_path / "straight"
    job = write_job(straight, samples=40)  # 10 batches of 4
    _run(_command(job, 10), straight)

    short = tmp_path / "short"
    job = write_job(short, samples=24)  # 6 batches of 4: ends at step 6 of 10
    ended = _run(_command(job, 10), short, status=2)
    errors = [line for line in ended.stderr.splitlines() if line.startswith("dskd: error:")]
    assert len(errors) == 1, ended.stderr[-3000:]
    assert str(short / "train.jsonl") in errors[0] and "ended after 6 batches of 4 (24 samples)" in errors[0]
    assert "train.max_steps = 10" in errors[0] and "step 6 is checkpointed" in errors[0] and "--resume" in errors[0]
    assert _steps_on_disk(short / "run" / "checkpoints" / "distill")[-1] == 6
    assert not (short / "run" / "final").exists()

    again = _run(_command(job, 10, "--resume"), short, status=2)  # resumed at the end: the same line, at once
    errors = [line for line in again.stderr.splitlines() if line.startswith("dskd: error:")]
    assert len(errors) == 1 and "ended after 6 batches of 4" in errors[0] and "step 6 is checkpointed" in errors[0]

    (short / "train.jsonl").write_text("\n".join(lines) + "\n")  # the corpus grows to the straight run's 40
    resumed = _run(_command(job, 10, "--resume"), short)
    assert "resumed from step-00000006" in resumed.stdout
    _assert_same_run(straight / "run", short / "run", 10)
