"""Every policy with every objective that can take it, on one vocabulary and across two: a real tiny job runs a
few steps with finite losses, and the metrics say which policy made each step's batches."""

from __future__ import annotations

import math

import pytest
from policy_setup import make_job, metrics, write_policy_job

STEPS = 3
# Each policy's options (tiny samples), and the batch labels (`policy/<label>` metrics) its steps may show.
SAMPLING = {"max_new_tokens": 6}
POLICIES = {
    "off_policy": ("off_policy", {}, {"off_policy"}),
    "on_policy": ("on_policy", SAMPLING, {"on_policy:sampled"}),
    "mixed_lam0": ("mixed", {**SAMPLING, "lam": 0.0}, {"off_policy"}),
    "mixed_lam1": ("mixed", {**SAMPLING, "lam": 1.0}, {"mixed:sampled"}),
    "mixed_lam0.5": ("mixed", {**SAMPLING, "lam": 0.5}, {"off_policy", "mixed:sampled"}),
    "adaptive": (
        "adaptive",
        {**SAMPLING, "init_prob": 1.0, "max_prob": 1.0, "buffer_size": 2, "replay_prob": 0.5},
        {"adaptive:sampled", "adaptive:replay"},
    ),
    "teacher_generated": ("teacher_generated", SAMPLING, {"teacher_generated"}),
}
OBJECTIVES = {"same": ("dskd_v2", "kd", "dskd"), "different": ("dskd_v2", "uld", "mined_kd", "dskd_cma")}
CASES = [
    (vocab, objective, policy) for vocab, names in OBJECTIVES.items() for objective in names for policy in POLICIES
]
# sft has no KD term: it takes the dataset's responses or, as sequence-level KD, the teacher's (the sampling
# policies refuse it, tests/test_policy_refusals.py).
CASES += [(vocab, "sft", policy) for vocab in OBJECTIVES for policy in ("off_policy", "teacher_generated")]
# The fast suite runs one sampling policy per vocabulary; CI runs the whole matrix.
FAST = {("same", "kd", "mixed_lam0.5"), ("different", "dskd_v2", "on_policy")}


def run_policy(tmp_path, vocab: str, objective: str, policy: str) -> list[dict]:
    name, options, _ = POLICIES[policy]
    job = make_job(
        write_policy_job(tmp_path, vocab=vocab, objective=objective, policy=name, options=options, steps=STEPS)
    )
    job.distill(None)
    return metrics(tmp_path / "run")


@pytest.mark.parametrize(
    "vocab, objective, policy",
    [pytest.param(*case, marks=() if case in FAST else pytest.mark.integration, id="-".join(case)) for case in CASES],
)
def test_every_policy_trains_with_finite_losses_and_names_its_batches(tmp_path, vocab, objective, policy):
    lines = run_policy(tmp_path, vocab, objective, policy)
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    allowed = POLICIES[policy][2]
    for line in lines:
        terms = {k: v for k, v in line.items() if k.startswith("train/")}
        assert "train/loss" in terms and "train/ce" in terms
        assert all(math.isfinite(v) for v in terms.values()), terms
        labels = {k.removeprefix("policy/"): v for k, v in line.items() if k.startswith("policy/")}
        # One data batch per step (grad_accum 1), made by exactly one of the policy's branches.
        assert set(labels) <= allowed and sum(labels.values()) == 1, labels
    if policy == "adaptive":
        assert "policy/adaptive:sampled" in lines[0], "the first step has nothing to replay yet"
    if objective != "sft" and allowed != {"off_policy"}:
        # A distilled sample carries KD terms; a step that sampled logs them over the samples.
        sampled = [line for line in lines if not line.get("policy/off_policy")]
        assert sampled and all(any(k.startswith("train/kd") for k in line) for line in sampled)
