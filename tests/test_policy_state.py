"""Sampling policies are reproducible and resumable: the same seed samples the same continuations, and the
mixed/adaptive draws, the adaptive probability and the replay buffer continue identically after a checkpoint."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
from policy_setup import example_batch, make_job, metrics, policy_context, write_policy_job

from dskd.plugins.policies.adaptive import adaptive
from dskd.plugins.policies.mixed import mixed
from dskd.plugins.policies.on_policy import on_policy
from dskd.run.engine import Trainer

SAMPLING = {"max_new_tokens": 5}


def fresh(batch):
    """A copy of the data loader's batch (policies mark the batches they return)."""
    return dataclasses.replace(batch, meta={})


def step_outputs(policy, batch, steps) -> list[tuple[str, list[list[int]]]]:
    """Per step: the label of the batch that carries the KD, and its student ids."""
    out = []
    for step in steps:
        prepared = policy.prepare(fresh(batch), step)
        kd = prepared[-1] if isinstance(prepared, list) else prepared
        out.append((kd.meta["policy"], kd.student_input_ids.tolist()))
    return out


def checkpoint_round_trip(state: dict) -> dict:
    """What a resumed run reads back: the state through torch.save / torch.load, as `dskd.run.checkpoint` does."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.fixture(scope="module")
def same_vocab():
    return policy_context("same"), example_batch("same")


def test_the_same_seed_samples_the_same_continuations_and_leaves_the_training_rng_alone(same_vocab):
    context, batch = same_vocab
    before = torch.random.get_rng_state()
    first = step_outputs(on_policy(context, **SAMPLING), batch, [0, 1])
    assert torch.equal(torch.random.get_rng_state(), before), "sampling drew from the training RNG"
    again = step_outputs(on_policy(context, **SAMPLING), batch, [0, 1])
    assert first == again
    assert first[0][1] != first[1][1], "two steps sampled the same continuations"
    other_seed = step_outputs(on_policy(dataclasses.replace(context, seed=1), **SAMPLING), batch, [0])
    assert other_seed[0][1] != first[0][1]


def test_on_policy_distils_the_datasets_responses_until_its_start_step(same_vocab):
    context, batch = same_vocab
    labels = [label for label, _ in step_outputs(on_policy(context, start_step=2, **SAMPLING), batch, range(4))]
    assert labels == ["off_policy", "off_policy", "on_policy:sampled", "on_policy:sampled"]


def test_mixed_draws_continue_identically_after_a_checkpoint(same_vocab):
    context, batch = same_vocab
    straight = mixed(context, lam=0.5, **SAMPLING)
    before = step_outputs(straight, batch, range(4))
    state = checkpoint_round_trip(straight.state_dict())
    after = step_outputs(straight, batch, range(4, 10))
    labels = {label for label, _ in before + after}
    assert labels == {"off_policy", "mixed:sampled"}, "setup: ten draws at lam 0.5 should give both branches"

    resumed = mixed(context, lam=0.5, **SAMPLING)
    resumed.load_state_dict(state)
    assert step_outputs(resumed, batch, range(4, 10)) == after
    unrestored = step_outputs(mixed(context, lam=0.5, **SAMPLING), batch, range(4, 10))
    assert [label for label, _ in unrestored] != [label for label, _ in after], (
        "setup: the draws do not depend on the state"
    )


def test_adaptive_probability_and_replay_buffer_continue_identically_after_a_checkpoint(same_vocab):
    context, batch = same_vocab
    options = dict(init_prob=0.6, increase=0.2, max_prob=1.0, buffer_size=2, replay_prob=0.5, **SAMPLING)
    straight = adaptive(context, **options)
    losses = iter([3.0, 2.0, 2.5, 2.6, 1.0, 1.5, 1.7, 1.2, 1.9, 2.0])
    before = []
    for step in range(4):
        before += step_outputs(straight, batch, [step])
        straight.observe(step + 1, {"train/loss": next(losses)})
    state = checkpoint_round_trip(straight.state_dict())
    lam, buffered = straight.lam, len(straight.buffer)
    assert lam == pytest.approx(0.6 + 2 * 0.2) and buffered >= 1, "setup: two rises, and something sampled"
    after = []
    for step in range(4, 10):
        after += step_outputs(straight, batch, [step])
        straight.observe(step + 1, {"train/loss": next(losses)})
    assert {label for label, _ in after} >= {"adaptive:sampled", "adaptive:replay"}, "setup: no replay happened"

    resumed = adaptive(context, **options)
    resumed.load_state_dict(state)
    assert (resumed.lam, len(resumed.buffer)) == (lam, buffered)
    losses = iter([1.0, 1.5, 1.7, 1.2, 1.9, 2.0])
    again = []
    for step in range(4, 10):
        again += step_outputs(resumed, batch, [step])
        resumed.observe(step + 1, {"train/loss": next(losses)})
    assert again == after
    assert resumed.state_dict()["lam"] == straight.state_dict()["lam"]


def test_adaptive_raises_the_probability_only_when_the_loss_rises(same_vocab):
    context, _ = same_vocab
    policy = adaptive(context, init_prob=0.1, increase=0.25, max_prob=0.5, **SAMPLING)
    seen = []
    for loss in (2.0, 1.5, 1.8, 1.7, 1.9, 2.5):
        policy.observe(0, {"train/loss": loss})
        seen.append(policy.lam)
    # First interval: nothing to compare with; falls keep it; rises add `increase`, capped at max_prob.
    assert seen == pytest.approx([0.1, 0.1, 0.35, 0.35, 0.5, 0.5])
    policy.observe(0, {"perf/tokens_per_s": 1.0})  # an interval without a loss changes nothing
    assert policy.lam == pytest.approx(0.5)


@pytest.mark.integration
@pytest.mark.parametrize("vocab", ["same", "different"])
def test_a_resumed_adaptive_run_logs_what_an_uninterrupted_run_logs(tmp_path, monkeypatch, vocab):
    options = {**SAMPLING, "init_prob": 0.5, "increase": 0.3, "max_prob": 1.0, "buffer_size": 2, "replay_prob": 0.5}
    overrides = ["train.save_every=2", "run.deterministic=true"]

    def job(folder):
        return make_job(
            write_policy_job(folder, vocab=vocab, objective="dskd_v2", policy="adaptive", options=options, steps=6),
            overrides,
        )

    job(tmp_path / "straight").distill(None)
    straight = metrics(tmp_path / "straight" / "run")

    original = Trainer.train_step

    def crash_in_step_5(self, window, meter):
        if self.state.step == 4:
            raise KeyboardInterrupt
        return original(self, window, meter)

    crashed = job(tmp_path / "crashed")
    monkeypatch.setattr(Trainer, "train_step", crash_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        crashed.distill(None)
    monkeypatch.setattr(Trainer, "train_step", original)
    make_job(tmp_path / "crashed" / "job.toml", overrides, resume=True).distill(None)
    lines = metrics(tmp_path / "crashed" / "run")

    def policy_labels(line):
        return {k: v for k, v in line.items() if k.startswith("policy/")}

    assert [line["step"] for line in lines] == [line["step"] for line in straight] == list(range(1, 7))
    assert [policy_labels(line) for line in lines] == [policy_labels(line) for line in straight]
    assert len({tuple(policy_labels(line)) for line in straight}) > 1, "setup: every step took the same branch"
    for a, b in zip(lines, straight):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-6)
