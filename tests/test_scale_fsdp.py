"""FSDP2 (`train.sharding = "fsdp"`): two real processes over gloo against one process with the same global batch,
through the real `dskd` command; sharded checkpoints, SIGKILL and resume; refusals of what cannot resume.

Real FSDP: `fully_shard` runs on CPU with the gloo backend, so each process holds half of every weight, gradient
and Adam moment, and the objectives read the LM head through the head view while the root is unsharded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from policy_setup import write_policy_job
from tiny_job import write_job

from dskd.run import checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.slow]
STEPS = 20
SAVE_EVERY = 4
TIMEOUT = 900  # generous: a loaded 2-core machine


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dskd(processes: int, job: Path, batch_size: int, *extra: str) -> list[str]:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        + ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
        if processes > 1
        else [sys.executable]
    )
    sets = [f"train.batch_size={batch_size}", f"train.max_steps={STEPS}", f"train.save_every={SAVE_EVERY}"]
    sets += ["run.deterministic=true", "train.warmup_steps=2"]
    if processes > 1:
        sets.append("train.sharding=fsdp")
    return [*launcher, "-m", "dskd", "run", str(job), *(a for s in sets for a in ("--set", s)), *extra]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float32).state_dict()


def _descendants(pid: int) -> list[int]:
    """The process ids below `pid` (children first level by level), read from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, frontier = [], [pid]
    while frontier:
        frontier = [child for p in frontier for child in parents.get(p, [])]
        found += frontier
    return found


def _job(folder: Path, setup: str) -> Path:
    if setup == "kd, same tokenizer":
        return write_job(folder, objective="kd")
    # dskd_v2 across tokenizers: a GPT-2 student (tied head) under a Llama teacher on the Mistral tokenizer.
    return write_policy_job(folder, vocab="different", objective="dskd_v2", samples=48)


SETUPS = ("kd, same tokenizer", "dskd_v2, GPT-2 student, Mistral teacher")


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """setup -> (one-process run folder, two-process FSDP run folder), each pair run once per module."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(setup: str) -> tuple[Path, Path]:
        if setup not in made:
            root = tmp_path_factory.mktemp("fsdp")
            one, two = root / "one", root / "two"
            _run(_dskd(1, _job(one, setup), 4), one)
            _run(_dskd(2, _job(two, setup), 2), two)
            made[setup] = one, two
        return made[setup]

    return get


@pytest.fixture(scope="module", params=SETUPS)
def runs(request, launched):
    return (request.param, *launched(request.param))


@pytest.fixture(scope="module")
def kd_runs(launched):
    """The kd setup alone: enough for the crash, checkpointing, launcher and precision tests."""
    return (SETUPS[0], *launched(SETUPS[0]))


def test_fsdp_over_two_processes_gives_the_losses_of_one_process_with_the_global_batch(runs):
    # Each global batch of 4 is sliced 2 + 2; FSDP averages the reduce-scattered gradients as DDP does, and the
    # head's gradient (read through the head view while the root is unsharded) is reduced with the embedding's.
    _, one, two = runs
    a_lines, b_lines = _metrics(one / "run"), _metrics(two / "run")
    assert [r["step"] for r in a_lines] == [r["step"] for r in b_lines] == list(range(1, STEPS + 1))
    for a, b in zip(a_lines, b_lines):
        assert abs(a["train/loss"] - b["train/loss"]) <= 1e-5 * abs(a["train/loss"]), (a["step"], a, b)
        for key in (k for k in a if k.startswith("train/") and k != "train/lr"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])
        assert a["train/lr"] == b["train/lr"]


def test_the_final_student_of_a_sharded_run_is_one_ordinary_model_equal_to_the_one_process_run(runs):
    _, one, two = runs
    assert not any(p.name.endswith((".distcp", ".metadata")) for p in (two / "run" / "final").iterdir())
    expected, got = _weights(one / "run"), _weights(two / "run")
    assert expected.keys() == got.keys()
    for name in expected:
        # Adam divides by sqrt(v): float32 noise in a gradient moves a weight by about lr x its relative size, far
        # below the lr-sized steps that a wrong or missing gradient (an unsynchronised head) would give.
        assert float((expected[name] - got[name]).abs().max()) < 1e-5, name


def test_a_sharded_checkpoint_holds_every_process_s_shards_and_everything_a_ddp_checkpoint_holds(runs):
    _, _, two = runs
    root = two / "run" / "checkpoints" / "distill"
    shared, own = root / f"step-{STEPS:08d}", root / "rank-1" / f"step-{STEPS:08d}"
    names = {p.name for p in shared.iterdir()}
    assert {"scheduler.pt", "rng.pt", "policy.pt", "manifest.json", "sharded"} <= names
    assert "model.pt" not in names and "optimizer.pt" not in names  # model and optimizer: in the shards
    shards = {p.name for p in (shared / "sharded").iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= shards
    manifest = json.loads((shared / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and {"sharded/__0_0.distcp", "sharded/__1_0.distcp"} <= set(manifest["files"])
    assert checkpoint.verify(shared) is None
    assert {p.name for p in own.iterdir()} == {"rng.pt", "policy.pt", "manifest.json"}


def test_a_sharded_run_killed_with_sigkill_resumes_to_the_weights_of_the_uninterrupted_run(kd_runs, tmp_path):
    setup, _, two = kd_runs
    crashed = tmp_path / "crashed"
    job = _job(crashed, setup)
    root = crashed / "run" / "checkpoints" / "distill"
    log = (crashed / "first-attempt.log").open("w")
    process = subprocess.Popen(_dskd(2, job, 2), cwd=crashed, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + TIMEOUT
    while len(checkpoint.checkpoints(root)) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    alive = process.poll() is None
    # torchrun starts each worker in a session of its own: kill the workers and the launcher, all at once.
    for pid in [*_descendants(process.pid), process.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(60)
    log.close()
    assert alive, (
        f"the first attempt ended before it was killed:\n{(crashed / 'first-attempt.log').read_text()[-3000:]}"
    )
    assert not (crashed / "run" / "final").exists()
    steps = [int(p.name.split("-")[1]) for p in checkpoint.checkpoints(root)]
    assert steps[-1] < STEPS

    # A resume with another number of processes is refused before anything is written.
    before = {p: p.stat().st_mtime_ns for p in (crashed / "run").rglob("*") if p.is_file()}
    refused = subprocess.run(
        _dskd(1, job, 4, "--resume"), cwd=crashed, env=_env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert refused.returncode == 2, refused.stderr[-3000:]
    errors = [line for line in refused.stderr.splitlines() if line.startswith("dskd: error:")]
    assert len(errors) == 1 and "Traceback" not in refused.stderr and "2 processes" in errors[0], refused.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in (crashed / "run").rglob("*") if p.is_file()} == before

    resumed = _run(_dskd(2, job, 2, "--resume"), crashed)
    assert f"resumed from step-{steps[-1]:08d}" in resumed.stdout
    expected, got = _weights(two / "run"), _weights(crashed / "run")
    for name in expected:
        assert torch.equal(expected[name], got[name]), name  # bit for bit
    assert [r["step"] for r in _metrics(crashed / "run")] == list(range(1, STEPS + 1))


def test_gradient_checkpointing_under_fsdp_gives_identical_training(kd_runs, tmp_path):
    setup, _, two = kd_runs
    _run(_dskd(2, _job(tmp_path, setup), 2, "--set", "student.gradient_checkpointing=true"), tmp_path)
    assert [r["train/loss"] for r in _metrics(tmp_path / "run")] == [r["train/loss"] for r in _metrics(two / "run")]
    expected, got = _weights(two / "run"), _weights(tmp_path / "run")
    for name in expected:
        assert torch.equal(expected[name], got[name]), name  # recomputed activations are the same activations


def test_accelerate_s_fsdp2_config_shards_like_train_sharding(kd_runs, tmp_path):
    setup, _, two = kd_runs
    config = Path(__file__).resolve().parents[1] / "examples" / "accelerate" / "fsdp2.yaml"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    launch += ["--num_processes", "2", "--main_process_port", str(_free_port())]
    command = _dskd(1, _job(tmp_path, setup), 2)  # one-process command line: no train.sharding set
    _run([*launch, *command[1:]], tmp_path)
    assert (tmp_path / "run" / "checkpoints" / "distill" / f"step-{STEPS:08d}" / "sharded").is_dir()
    assert [r["train/loss"] for r in _metrics(tmp_path / "run")] == [r["train/loss"] for r in _metrics(two / "run")]


def test_bf16_under_fsdp_computes_in_bfloat16_and_keeps_float32_weights(kd_runs, tmp_path):
    setup, _, two = kd_runs
    _run(_dskd(2, _job(tmp_path, setup), 2, "--set", "train.precision=bf16"), tmp_path)
    want, got = _metrics(two / "run"), _metrics(tmp_path / "run")
    rel = [abs(a["train/loss"] - b["train/loss"]) / a["train/loss"] for a, b in zip(want, got)]
    assert max(rel) < 1e-2 and any(r > 0 for r in rel)  # bfloat16 compute: close, not identical
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "final" / "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.float32}


def test_dskd_cma_under_fsdp_trains_as_under_ddp(tmp_path):
    # dskd_cma reads the student's input embeddings (not only its head) inside the loss; under FSDP it must read
    # the trained, whole parameter. Compared with DDP over the same two processes, which slices the batch alike.
    runs = {}
    for sharding in ("fsdp", "none"):
        folder = tmp_path / sharding
        job = write_policy_job(folder, vocab="different", objective="dskd_cma", samples=24)
        # A high learning rate, so that embeddings read stale (as they were at setup) change the losses visibly; no
        # clipping, whose norm DDP (torch's float32 vector_norm) and FSDP compute with different rounding.
        extra = ("--set", f"train.sharding={sharding}", "--set", "train.max_steps=6", "--set", "train.lr=0.05")
        extra += ("--set", "train.clip_grad=0")
        _run(_dskd(2, job, 2, *extra), folder)
        runs[sharding] = [r["train/loss"] for r in _metrics(folder / "run")]
    assert len(runs["fsdp"]) == 6
    for a, b in zip(runs["none"], runs["fsdp"]):
        assert abs(a - b) <= 1e-7 * abs(a), (runs["none"], runs["fsdp"])


def _lora_job(folder: Path) -> Path:
    from test_lora import _lora_job as lora_job

    return lora_job(folder, objective="dskd_v2", steps=STEPS)


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """A LoRA student (dropout 0, so every process draws nothing) in one process, and in two under FSDP (with
    gradient checkpointing, merged at the end) and under DDP."""
    root = tmp_path_factory.mktemp("lora")
    one, fsdp, ddp = root / "one", root / "fsdp", root / "ddp"
    _run(_dskd(1, _lora_job(one), 4), one)
    extra = ("--set", "student.gradient_checkpointing=true", "--set", "student.merge_lora=true")
    _run(_dskd(2, _lora_job(fsdp), 2, *extra), fsdp)
    _run(_dskd(2, _lora_job(ddp), 2, "--set", "train.sharding=none"), ddp)
    return one, fsdp, ddp


def test_lora_composes_with_fsdp_and_ddp(lora_runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    one, fsdp, ddp = lora_runs
    want = _metrics(one / "run")
    for other in (fsdp, ddp):
        got = _metrics(other / "run")
        assert len(got) == len(want) == STEPS
        for a, b in zip(want, got):
            assert abs(a["train/loss"] - b["train/loss"]) <= 1e-5 * abs(a["train/loss"]), (other.name, a, b)
    ids = torch.arange(3, 40).reshape(1, -1)

    def adapted(run: Path, adapter: Path) -> torch.Tensor:
        base = AutoModelForCausalLM.from_pretrained(run / "base")
        with torch.no_grad():
            return PeftModel.from_pretrained(base, adapter).eval()(input_ids=ids).logits

    reference = adapted(one, one / "run" / "final")
    assert torch.allclose(adapted(ddp, ddp / "run" / "final"), reference, atol=1e-5)
    assert torch.allclose(adapted(fsdp, fsdp / "run" / "final" / "adapter"), reference, atol=1e-5)
    with torch.no_grad():  # the merged model written from the gathered shards
        merged = AutoModelForCausalLM.from_pretrained(fsdp / "run" / "final").eval()(input_ids=ids).logits
    assert torch.allclose(merged, reference, atol=1e-5)
