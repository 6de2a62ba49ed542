"""The training loop: loss normalisation under gradient accumulation, exact resume, checkpoint safety."""

from __future__ import annotations

import shutil

import pytest
import torch
from tiny_job import write_job

from dskd.config import load_config
from dskd.registry import load_registry
from dskd.run import checkpoint
from dskd.run.engine import Trainer
from dskd.run.job import Job

REGISTRY = load_registry()


def _job(tmp_path, overrides=(), **kwargs) -> Job:
    path = write_job(tmp_path, **kwargs)
    config = load_config(path, list(overrides), registry=REGISTRY)
    job = Job(config, REGISTRY)
    job.prepare_run_dir()
    return job


def _capture_first_step_grads(monkeypatch, job: Job) -> list[torch.Tensor]:
    """Run the distill stage for one step and return the gradients the optimizer saw."""
    seen: list[torch.Tensor] = []
    original_init = Trainer.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        step = self.optimizer.step

        def record(*a, **k):
            if not seen:
                seen.extend(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params)
            return step(*a, **k)

        self.optimizer.step = record

    monkeypatch.setattr(Trainer, "__init__", init)
    job.distill(None)
    return seen


@pytest.mark.integration
def test_two_micro_batches_give_the_gradient_of_one_batch_holding_both(tmp_path, monkeypatch):
    # The same 4 sequences as one micro-batch of 4, or as 2 micro-batches of 2 (the shuffled order does not
    # depend on the batch size): spec §0 normalisation makes the step's gradient the same global token mean.
    one = _capture_first_step_grads(
        monkeypatch, _job(tmp_path / "a", ["train.batch_size=4", "train.grad_accum=1", "train.max_steps=1"])
    )
    two = _capture_first_step_grads(
        monkeypatch, _job(tmp_path / "b", ["train.batch_size=2", "train.grad_accum=2", "train.max_steps=1"])
    )
    assert len(one) == len(two) > 0
    for a, b in zip(one, two):
        scale = a.abs().max().clamp_min(1e-12)
        assert float((a - b).abs().max() / scale) < 1e-5


def _final_weights(job: Job) -> dict[str, torch.Tensor]:
    job.distill(None)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(job.run_dir / "final").state_dict()


@pytest.mark.integration
def test_a_run_resumed_after_a_crash_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch):
    overrides = ["train.max_steps=6", "train.save_every=2"]
    straight = _final_weights(_job(tmp_path / "straight", overrides))

    crashed = _job(tmp_path / "crashed", overrides)
    original = Trainer.train_step

    def crash_at_step_5(self, window, meter):
        if self.state.step == 4:  # steps 1-4 done and checkpointed at 2 and 4; die inside step 5
            raise KeyboardInterrupt
        return original(self, window, meter)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        crashed.distill(None)
    monkeypatch.setattr(Trainer, "train_step", original)
    config = load_config(tmp_path / "crashed" / "job.toml", overrides, registry=REGISTRY)
    resumed = Job(config, REGISTRY, resume=True)
    resumed.prepare_run_dir()
    weights = _final_weights(resumed)
    assert weights.keys() == straight.keys()
    for name in straight:
        assert torch.equal(weights[name], straight[name]), name
    steps = [line for line in (tmp_path / "crashed" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 6  # steps 5-6 of the crashed attempt were never logged twice


def test_a_corrupt_newest_checkpoint_is_named_and_the_previous_one_used(tmp_path):
    root = tmp_path / "ckpt"
    for step in (1, 2):
        checkpoint.save(root, step, {"model": {"w": torch.full((3,), float(step))}}, {"note": step}, keep=3)
    (root / "step-00000002" / "model.pt").write_bytes(b"garbage")
    warnings: list[str] = []
    found = checkpoint.latest(root, warn=warnings.append)
    assert found is not None and found.manifest["step"] == 1
    assert len(warnings) == 1 and "step-00000002" in warnings[0] and "checksum" in warnings[0]
    assert torch.equal(found.load("model")["w"], torch.full((3,), 1.0))


def test_an_interrupted_checkpoint_write_never_replaces_a_good_one(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    checkpoint.save(root, 1, {"model": {"w": torch.ones(2)}}, {}, keep=3)

    def broken_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    with pytest.raises(OSError):
        checkpoint.save(root, 2, {"model": {"w": torch.zeros(2)}}, {}, keep=3)
    assert [p.name for p in checkpoint.checkpoints(root)] == ["step-00000001"]
    assert checkpoint.latest(root).manifest["step"] == 1


def test_keep_checkpoints_prunes_the_oldest(tmp_path):
    root = tmp_path / "ckpt"
    for step in range(1, 5):
        checkpoint.save(root, step, {"x": step}, {}, keep=2)
    assert [p.name for p in checkpoint.checkpoints(root)] == ["step-00000003", "step-00000004"]


@pytest.mark.integration
def test_resume_refuses_a_different_teacher_unless_forced(tmp_path):
    from dskd.errors import CheckpointError

    job = _job(tmp_path, ["train.max_steps=2", "train.save_every=1"])
    job.distill(None)
    # A different teacher (another seed gives other random weights, hence another fingerprint).
    shutil.rmtree(tmp_path / "run" / "final")
    config = load_config(tmp_path / "job.toml", ["train.max_steps=3", "run.seed=4"], registry=REGISTRY)
    with pytest.raises(CheckpointError, match="different teacher"):
        Job(config, REGISTRY, resume=True).distill(None)
    Job(config, REGISTRY, resume=True, force_resume=True).distill(None)


@pytest.mark.integration
def test_a_finished_run_directory_is_not_overwritten_without_resume(tmp_path):
    from dskd.errors import DskdError

    job = _job(tmp_path, ["train.max_steps=1"])
    job.distill(None)
    config = load_config(tmp_path / "job.toml", ["train.max_steps=1"], registry=REGISTRY)
    with pytest.raises(DskdError, match="--resume"):
        Job(config, REGISTRY).prepare_run_dir()


@pytest.mark.integration
def test_bf16_training_runs_and_stays_close_to_fp32(tmp_path):
    import json

    def losses(sub, overrides):
        job = _job(tmp_path / sub, ["train.max_steps=2", *overrides])
        job.distill(None)
        return [
            json.loads(line)["train/loss"]
            for line in (tmp_path / sub / "run" / "metrics.jsonl").read_text().splitlines()
        ]

    fp32 = losses("fp32", [])
    bf16 = losses("bf16", ["train.precision=bf16", "student.dtype=bfloat16", "teacher.dtype=bfloat16"])
    # Losses are always reduced in float32; bf16 weights and activations move them by well under a percent.
    for a, b in zip(fp32, bf16):
        assert abs(a - b) <= 2e-2 * abs(a)


def test_train_step_runs_on_a_trainer_given_its_optimizer_and_takes_the_kit_loss_gradient(tmp_path, monkeypatch):
    """`Trainer` takes its optimizer from outside, so a test drives `train_step` directly: one SGD step moves every
    weight by -lr times the gradient of the loss `dskd.kit.loss_terms_on_batch` computes for the same batch."""
    import copy

    from dskd.console import Console
    from dskd.kit import loss_terms_on_batch
    from dskd.run.components import Student, build_objective, build_student, build_teacher
    from dskd.run.engine import StageSpec
    from dskd.run.launch import make_accelerator
    from dskd.run.meter import Meter

    monkeypatch.chdir(tmp_path)
    config = load_config(write_job(tmp_path, objective="kd"), ["train.clip_grad=0"], registry=REGISTRY)
    student = build_student(config, torch.device("cpu"))
    twin = Student(copy.deepcopy(student.model), student.tokenizer)
    samples = [("### Instruction:\nName a colour.\n### Response:\n", "Blue."), ("Say hi.\n", "Hi there, friend.")]
    reference = loss_terms_on_batch(config, samples, student=twin, registry=REGISTRY)
    reference.loss.backward()
    lr = 0.1
    expected = {name: (p - lr * p.grad).detach() for name, p in twin.model.named_parameters() if p.grad is not None}

    teacher = build_teacher(config, torch.device("cpu"))
    objective, ce_terms = build_objective(config, REGISTRY, student, teacher, None)
    policy = REGISTRY.get("policies", REGISTRY.default("policies"))(None)
    spec = StageSpec(
        "distill",
        student.model,
        objective,
        policy,
        teacher,
        lambda consumed: iter(()),
        config.train,
        tmp_path / "run",
        1,
        kd_rate=config.objective.kd_rate,
        ce_terms=ce_terms,
    )
    trainer = Trainer(
        spec, make_accelerator("no"), Console(enabled=False), torch.optim.SGD(student.model.parameters(), lr=lr)
    )
    trainer.train_step([reference.batch], Meter())
    assert trainer.state.step == 1 and expected
    for name, p in student.model.named_parameters():
        if name in expected:
            torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-7)
