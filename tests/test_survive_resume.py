"""Exact resume after SIGKILL of the real `dskd run` process; partial checkpoints named and skipped; resumes
against another tokenizer refused unless forced.

tests/test_engine.py covers a corrupt newest checkpoint, an interrupted write and a changed teacher in process;
these add the real crash (no Python cleanup runs) and the leftovers it leaves.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_job import TOKENIZERS, write_job

from dskd.run import checkpoint

STEPS = 30
SAVE_EVERY = 2
WAIT = 600.0  # seconds: generous for a loaded 2-core machine


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}


def _command(job: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dskd",
        "run",
        str(job),
        "--set",
        f"train.max_steps={STEPS}",
        "--set",
        f"train.save_every={SAVE_EVERY}",
        "--set",
        "run.deterministic=true",
        *extra,
    ]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=WAIT, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float32).state_dict()


def _completed_steps(root: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in checkpoint.checkpoints(root)]


@pytest.mark.integration
def test_a_run_killed_with_sigkill_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    _run(_command(write_job(straight)), straight)

    job = write_job(crashed)
    root = crashed / "run" / "checkpoints" / "distill"
    log = (crashed / "first-attempt.log").open("w")
    process = subprocess.Popen(_command(job), cwd=crashed, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + WAIT
    # Two checkpoints on disk (so that a broken newer one can fall back to an older one), then kill at once.
    while len(_completed_steps(root)) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    alive = process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait(60)
    log.close()
    assert alive, (
        f"the first attempt ended before it could be killed:\n{(crashed / 'first-attempt.log').read_text()[-3000:]}"
    )
    assert not (crashed / "run" / "final").exists()
    good = _completed_steps(root)[-1]
    assert good < STEPS

    # Leftovers of crashes at worse moments: a write that never reached its rename, and a newer step folder
    # without its manifest (e.g. copied back by hand, or a filesystem that lost the manifest).
    partial = root / f".step-{good + 1:08d}.tmp-99999"
    partial.mkdir(exist_ok=True)
    (partial / "model.pt").write_bytes(b"half a checkpoint")
    headless = root / f"step-{STEPS - 1:08d}"
    shutil.copytree(root / f"step-{good:08d}", headless)
    (headless / "manifest.json").unlink()

    resumed = _run(_command(job, "--resume"), crashed)
    warnings = [line for line in resumed.stderr.splitlines() if line.startswith("warning:")]
    assert any(partial.name in line and "unfinished write" in line for line in warnings), resumed.stderr[-3000:]
    assert any(headless.name in line and "no manifest" in line for line in warnings), resumed.stderr[-3000:]
    assert f"resumed from step-{good:08d}" in resumed.stdout

    expected, got = _weights(straight / "run"), _weights(crashed / "run")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name  # bit for bit
    steps = [json.loads(line)["step"] for line in (crashed / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # each step logged once, whatever the crash cut


def test_unfinished_writes_and_headless_folders_are_each_named_in_one_line_and_skipped(tmp_path):
    root = tmp_path / "ckpt"
    checkpoint.save(root, 2, {"model": {"w": torch.full((2,), 2.0)}}, {}, keep=3)
    (root / ".step-00000004.tmp-4242").mkdir()
    (root / "step-00000003").mkdir()
    (root / "step-00000003" / "model.pt").write_bytes(b"no manifest next to me")
    warnings: list[str] = []
    found = checkpoint.latest(root, warn=warnings.append)
    assert found is not None and found.manifest["step"] == 2
    assert len(warnings) == 2 and all("\n" not in w for w in warnings)
    assert ".step-00000004.tmp-4242" in warnings[0] and "unfinished write" in warnings[0]
    assert "step-00000003" in warnings[1] and "no manifest" in warnings[1]


def test_pruning_never_removes_the_new_checkpoint_for_a_broken_later_one(tmp_path):
    root = tmp_path / "ckpt"
    (root / "step-00000009").mkdir(parents=True)  # left headless by an earlier, longer attempt
    checkpoint.save(root, 4, {"x": 4}, {}, keep=1)
    checkpoint.save(root, 6, {"x": 6}, {}, keep=1)
    assert [p.name for p in checkpoint.checkpoints(root)] == ["step-00000006", "step-00000009"]
    assert checkpoint.latest(root, warn=lambda _: None).manifest["step"] == 6


def test_with_only_broken_checkpoints_resume_names_them_and_finds_none(tmp_path):
    root = tmp_path / "ckpt"
    (root / "step-00000001").mkdir(parents=True)
    warnings: list[str] = []
    assert checkpoint.latest(root, warn=warnings.append) is None
    assert len(warnings) == 1 and "step-00000001" in warnings[0]
    with pytest.raises(checkpoint.CheckpointError, match="run without --resume"):
        checkpoint.require_latest(root, warn=lambda _: None)


@pytest.mark.integration
def test_resume_with_another_student_tokenizer_is_refused_unless_forced(tmp_path):
    job = write_job(tmp_path)
    _run(
        [sys.executable, "-m", "dskd", "run", str(job), "--set", "train.max_steps=2", "--set", "train.save_every=1"],
        tmp_path,
    )
    # As if it had died before its end (a finished run, with finished.json, is never resumed with changes).
    shutil.rmtree(tmp_path / "run" / "final")
    (tmp_path / "run" / "finished.json").unlink()
    # Mistral's tokenizer has the same 32000 ids as TinyLlama's, so the models still fit: only the fingerprint tells.
    other = ["--set", f"student.tokenizer={TOKENIZERS / 'mistral'}", "--set", "train.max_steps=3", "--resume"]
    refused = subprocess.run(
        [sys.executable, "-m", "dskd", "run", str(job), *other],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("dskd: error:")]
    assert len(errors) == 1 and "different student_tokenizer" in errors[0] and "--force-resume" in errors[0], (
        refused.stderr[-2000:]
    )
    _run([sys.executable, "-m", "dskd", "run", str(job), *other, "--force-resume"], tmp_path)
    assert (tmp_path / "run" / "final" / "config.json").exists()


def test_a_step_counts_only_when_every_process_saved_its_part_intact(tmp_path):
    root, part = tmp_path / "ckpt", tmp_path / "ckpt" / "rank-1"
    for step in (2, 4):
        checkpoint.save(root, step, {"model": step}, {}, keep=3)
        checkpoint.save(part, step, {"rng": step}, {}, keep=3)
    (part / "step-00000004" / "rng.pt").write_bytes(b"garbage")
    warnings: list[str] = []
    found = checkpoint.latest(root, warn=warnings.append, companions=[part])
    assert found.manifest["step"] == 2
    assert len(warnings) == 1 and str(part / "step-00000004") in warnings[0] and "checksum" in warnings[0]


def test_a_teacher_read_from_a_moved_folder_keeps_its_fingerprint(tmp_path):
    # Resume after moving a run (or its teacher) must not be refused as "a different teacher"; replicas that
    # keep the model in different folders must agree too.
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dskd.models.teacher import model_fingerprint

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32000,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "tinyllama")
    fingerprints = []
    for folder in (tmp_path / "here", tmp_path / "moved" / "there"):
        model.save_pretrained(folder)
        loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        assert loaded.config._name_or_path == str(folder)
        fingerprints.append(model_fingerprint(loaded, tokenizer, torch.float32))
    assert fingerprints[0] == fingerprints[1]
    with torch.no_grad():
        loaded.model.norm.weight[0] += 1e-3  # any change to the weights is still seen
    assert model_fingerprint(loaded, tokenizer, torch.float32) != fingerprints[0]


def _teacher_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run_dir / "teacher", dtype=torch.float32).state_dict()


@pytest.mark.integration
def test_an_interrupted_teacher_sft_checkpoints_and_resumes_to_the_teacher_of_an_uninterrupted_run(tmp_path):
    # Default checkpointing (no train.save_every): Ctrl-C must still keep the steps done, and --resume must
    # continue the SFT (not restart it, not skip to distillation) and reach the same teacher bit for bit.
    sft_steps = 40
    extra = f"\n[teacher_sft]\nsteps = {sft_steps}\nbatch_size = 4\nlr = 1e-3\n"
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    command = ["--set", "train.max_steps=1", "--set", "run.deterministic=true"]
    job = write_job(straight, stages=("teacher_sft", "distill"), extra=extra)
    _run([sys.executable, "-m", "dskd", "run", str(job), *command], straight)

    job = write_job(stopped, stages=("teacher_sft", "distill"), extra=extra)
    metrics = stopped / "run" / "metrics.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "dskd", "run", str(job), *command],
        cwd=stopped,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + WAIT
    while process.poll() is None and time.monotonic() < deadline:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if len(lines) >= 3:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=WAIT)
    assert process.returncode == 130, stdout[-2000:] + stderr[-3000:]
    assert "--resume" in stderr
    saved = checkpoint.latest(stopped / "run" / "checkpoints" / "teacher_sft", warn=lambda _: None)
    assert saved is not None, stderr[-3000:]
    assert 3 <= saved.manifest["step"] < sft_steps
    assert not (stopped / "run" / "teacher").exists()

    resumed = _run([sys.executable, "-m", "dskd", "run", str(job), *command, "--resume"], stopped)
    assert f"teacher_sft: resumed from step-{saved.manifest['step']:08d}" in resumed.stdout
    expected, got = _teacher_weights(straight / "run"), _teacher_weights(stopped / "run")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    steps = [
        json.loads(line)["step"]
        for line in metrics.read_text().splitlines()
        if json.loads(line)["stage"] == "teacher_sft"
    ]
    assert steps == list(range(1, sft_steps + 1))


@pytest.mark.integration
def test_checkpoints_are_written_every_save_every_minutes_without_a_step_interval(tmp_path):
    job = write_job(tmp_path, steps=4)
    # A tiny interval: every logged step is due. keep_checkpoints high enough to see them all.
    _run(
        [
            sys.executable,
            "-m",
            "dskd",
            "run",
            str(job),
            "--set",
            "train.save_every_minutes=1e-6",
            "--set",
            "train.keep_checkpoints=10",
        ],
        tmp_path,
    )
    assert _completed_steps(tmp_path / "run" / "checkpoints" / "distill") == [1, 2, 3, 4]
