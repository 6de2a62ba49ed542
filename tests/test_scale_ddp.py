"""Data parallelism: two student processes (DDP over gloo, launched by accelerate) against one process with the
same global batch, through the real `dskd` command."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_job import write_job

pytestmark = pytest.mark.integration
STEPS = 6
TIMEOUT = 600  # generous: a loaded 2-core machine; the runs take ~20 s each when idle


def _env() -> dict[str, str]:
    # CPU on any machine (a GPU box would otherwise put both processes on GPU 0); one thread per process.
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(batch_size: int) -> list[str]:
    return [
        "--set",
        f"train.batch_size={batch_size}",
        "--set",
        f"train.max_steps={STEPS}",
        "--set",
        "train.save_every=3",
        "--set",
        "run.deterministic=true",
    ]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _accelerate(num_processes: int, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        *args,
    ]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    one, two = root / "one", root / "two"
    _run([sys.executable, "-m", "dskd", "run", str(write_job(one)), *_overrides(4)], one)
    _run(_accelerate(2, "--multi_gpu", "-m", "dskd", "run", str(write_job(two)), *_overrides(2)), two)
    return one / "run", two / "run"


def test_two_processes_give_the_loss_curve_of_one_process_with_the_same_global_batch(runs):
    # Each global batch of 4 sequences is sliced 2 + 2 across the ranks; the loss is normalised by the global
    # token count and DDP averages the gradients, so every step is the same optimisation as one process's.
    # Residual: float32 summation order (two half-batch sums and a gloo all-reduce instead of one sum), about
    # 1e-7 relative on the loss; the small KL terms (~1e-3, differences of ~10-sized log-sum-exps) keep that
    # error in absolute terms, hence an absolute bound for the terms.
    one, two = _metrics(runs[0]), _metrics(runs[1])
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, STEPS + 1))  # written once, by rank 0
    for a, b in zip(one, two):
        assert abs(a["train/loss"] - b["train/loss"]) <= 1e-5 * abs(a["train/loss"]), (
            a["step"],
            a["train/loss"],
            b["train/loss"],
        )
        terms = {k for k in a if k.startswith("train/") and k != "train/lr"}
        assert terms == {k for k in b if k.startswith("train/") and k != "train/lr"}
        for key in terms:
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])
        assert a["train/lr"] == b["train/lr"]  # one scheduler step per optimizer step, not one per process


def test_every_rank_checkpoints_its_own_rng_and_policy_and_rank_0_the_shared_state(runs):
    root = runs[1] / "checkpoints" / "distill"
    for step in (3, STEPS):
        shared = root / f"step-{step:08d}"
        own = root / "rank-1" / f"step-{step:08d}"
        assert {p.name for p in shared.iterdir()} >= {
            "model.pt",
            "optimizer.pt",
            "scheduler.pt",
            "objective.pt",
            "rng.pt",
            "policy.pt",
            "manifest.json",
        }
        assert {p.name for p in own.iterdir()} == {"rng.pt", "policy.pt", "manifest.json"}
        for manifest in (shared / "manifest.json", own / "manifest.json"):
            body = json.loads(manifest.read_text())
            assert body["world_size"] == 2 and body["state"]["step"] == step
        # Each rank draws from its own generator state; the two saved states are those of two processes.
        assert (
            torch.load(shared / "rng.pt", weights_only=False)["torch"].shape
            == torch.load(own / "rng.pt", weights_only=False)["torch"].shape
        )


def test_the_final_student_of_two_processes_loads_and_matches_one_process(runs):
    from transformers import AutoModelForCausalLM

    one = AutoModelForCausalLM.from_pretrained(runs[0] / "final").state_dict()
    two = AutoModelForCausalLM.from_pretrained(runs[1] / "final").state_dict()
    assert one.keys() == two.keys()
    for name in one:
        # Adam divides by sqrt(v): float32 noise in a gradient moves a weight by up to ~lr x (its relative size),
        # far below the lr-sized steps a wrong gradient (an unsynchronised projector, a stale head) would give.
        assert float((one[name] - two[name]).abs().max()) < 1e-5, name


def test_the_accelerate_cpu_launch_of_two_processes_trains_like_the_multi_process_launch(runs, tmp_path):
    # accelerate's --cpu launcher starts one process for `--num_processes 2` (it needs mpirun for more); dskd
    # reads N back from the launcher and starts the two processes itself, so the command does what it says.
    done = _run(_accelerate(2, "--cpu", "-m", "dskd", "run", str(write_job(tmp_path)), *_overrides(2)), tmp_path)
    assert "dskd: error" not in done.stderr
    got = [line["train/loss"] for line in _metrics(tmp_path / "run")]
    want = [line["train/loss"] for line in _metrics(runs[1])]
    assert len(got) == len(want) == STEPS
    for a, b in zip(got, want):
        assert abs(a - b) <= 1e-5 * abs(b)
    assert (tmp_path / "run" / "checkpoints" / "distill" / "rank-1").is_dir()


def test_two_processes_resume_together_from_the_newest_step_both_saved_intact(runs, tmp_path):
    # Rank 1's part of the last checkpoint is corrupt: both processes fall back to step 3 (never rank 0 at
    # step 6 with rank 1's generator from step 3), and finish with the weights of the uninterrupted run.
    crashed = tmp_path / "two"
    shutil.copytree(runs[1].parent, crashed)
    shutil.rmtree(crashed / "run" / "final")
    (crashed / "run" / "finished.json").unlink()  # as if it had died before its end: a finished run is never resumed
    broken = crashed / "run" / "checkpoints" / "distill" / "rank-1" / f"step-{STEPS:08d}"
    (broken / "rng.pt").write_bytes(b"garbage")
    done = _run(
        _accelerate(2, "--multi_gpu", "-m", "dskd", "run", str(crashed / "job.toml"), *_overrides(2), "--resume"),
        crashed,
    )
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(broken) in warnings[0] and "checksum" in warnings[0], done.stderr[-3000:]
    assert "resumed from step-00000003" in done.stdout
    from transformers import AutoModelForCausalLM

    expected = AutoModelForCausalLM.from_pretrained(runs[1] / "final").state_dict()
    got = AutoModelForCausalLM.from_pretrained(crashed / "run" / "final").state_dict()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
