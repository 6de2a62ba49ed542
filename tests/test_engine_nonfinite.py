"""A run whose loss or gradients stop being finite: the step is skipped, a streak of them stops the run with one
line, and no weights that are not finite are ever saved (no final/, no results.json, the last good checkpoint kept).

Real tiny jobs (`tiny_job.write_job`): the learning rate of 1e8 a user can type, and a NaN-returning divergence of an
installed third-party package (`broken_plugins`).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from broken_plugins import error_lines, installed_env, run_dskd
from tiny_job import write_job

import dskd
from dskd.config import load_config
from dskd.errors import ConfigError
from dskd.registry import load_registry
from dskd.run import checkpoint
from dskd.run.engine import Trainer
from dskd.run.job import Job


def _checkpoint_steps(run_dir) -> list[str]:
    return [path.name for path in checkpoint.checkpoints(run_dir / "checkpoints" / "distill")]


def _assert_finite_checkpoint(run_dir, step: int) -> None:
    root = run_dir / "checkpoints" / "distill"
    found = checkpoint.latest(root)
    assert found is not None and found.manifest["state"]["step"] == step
    assert checkpoint.verify(found.path) is None
    assert all(bool(t.isfinite().all()) for t in found.load("model").values())


@pytest.mark.integration
def test_a_learning_rate_of_1e8_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    # Step 1 starts from finite weights and is checkpointed; its update (lr 1e8) makes every later gradient infinite.
    write_job(tmp_path, objective="kd", stages=("distill", "eval"), steps=8)
    result = run_dskd(
        "run",
        "job.toml",
        "--set",
        "train.lr=1e8",
        "--set",
        "train.save_every=1",
        env=installed_env(tmp_path / "site"),
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr[-3000:]
    assert "not finite for 3 steps in a row (steps 2-4" in lines[0] and "train.lr" in lines[0]
    assert f"the last checkpoint, {tmp_path / 'run' / 'checkpoints' / 'distill' / 'step-00000001'}, is kept" in lines[0]
    run_dir = tmp_path / "run"
    assert not (run_dir / "final").exists() and not (run_dir / "results.json").exists()
    assert _checkpoint_steps(run_dir) == ["step-00000001"]
    _assert_finite_checkpoint(run_dir, 1)
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["train/skipped_steps"]) for m in logged] == [(1, 0.0), (2, 1.0), (3, 1.0)]


@pytest.mark.integration
def test_a_nan_divergence_plugin_stops_after_max_bad_steps_without_a_final_model(tmp_path):
    write_job(tmp_path, objective="kd", steps=6)
    result = run_dskd(
        "run",
        "job.toml",
        "--set",
        "divergence.name=nan_kl",
        "--set",
        "train.max_bad_steps=2",
        env=installed_env(tmp_path / "site"),
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = error_lines(result)
    assert (
        len(lines) == 1 and "not finite for 2 steps in a row (steps 1-2" in lines[0] and "nothing was saved" in lines[0]
    ), lines
    run_dir = tmp_path / "run"
    assert not (run_dir / "final").exists()
    assert _checkpoint_steps(run_dir) == []


class Poisonable:
    """An in-process plugin: a forward KL that is NaN while `on` is set."""

    on = False

    def kl_or_nan(self, student_logits, teacher_logits, *, temperature=1.0):
        log_p_t = torch.log_softmax(teacher_logits.float() / temperature, -1)
        kl = (log_p_t.exp() * (log_p_t - torch.log_softmax(student_logits.float() / temperature, -1))).sum(-1)
        return kl * float("nan") if self.on else kl

    @dskd.hookimpl
    def dskd_register_divergences(self, register):
        register("kl_or_nan", self.kl_or_nan)


@pytest.mark.parametrize("clip_grad", [1.0, 0.0])  # without clipping the norm is still measured
def test_one_non_finite_step_is_skipped_and_the_run_goes_on(tmp_path, monkeypatch, clip_grad):
    # The plugin divergence is NaN during step 2 only.
    poisonable = Poisonable()
    registry = load_registry(extra_plugins=[poisonable])
    path = write_job(tmp_path, objective="kd", steps=4)
    job = Job(
        load_config(path, ["divergence.name=kl_or_nan", f"train.clip_grad={clip_grad}"], registry=registry), registry
    )
    job.prepare_run_dir()
    original = Trainer.train_step
    before: dict[str, torch.Tensor] = {}

    def step(self, window, meter):
        poisonable.on = self.state.step == 1  # the second step
        if poisonable.on:
            before.update(
                {k: v.detach().clone() for k, v in self.accelerator.unwrap_model(self.model).state_dict().items()}
            )
        original(self, window, meter)
        if poisonable.on:  # the skipped step left the weights exactly as they were
            after = self.accelerator.unwrap_model(self.model).state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before)
            assert all(p.grad is None for p in self.model.parameters())

    monkeypatch.setattr(Trainer, "train_step", step)
    final = job.distill(None)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["train/skipped_steps"] for m in logged] == [0.0, 1.0, 0.0, 0.0]
    assert math.isnan(logged[1]["train/loss"]) and all(math.isfinite(m["train/loss"]) for m in logged[2:])
    # Three updates for four steps: neither the optimizer nor the schedule moved on the skipped one.
    found = checkpoint.latest(tmp_path / "run" / "checkpoints" / "distill")
    assert found.manifest["state"]["step"] == 4
    assert {s["step"].item() for s in found.load("optimizer")["state"].values()} == {3.0}
    assert found.load("scheduler")["last_epoch"] == 3
    from transformers import AutoModelForCausalLM

    weights = AutoModelForCausalLM.from_pretrained(final).state_dict()
    assert all(bool(t.isfinite().all()) for t in weights.values())


def test_max_bad_steps_must_be_at_least_one(tmp_path):
    path = write_job(tmp_path)
    with pytest.raises(ConfigError, match=r"train.max_bad_steps: must be >= 1, got 0"):
        load_config(path, ["train.max_bad_steps=0"], registry=load_registry())
