"""A policy that cannot work in a run is refused at setup, with one sentence naming the problem and the fix."""

from __future__ import annotations

import dataclasses

import pytest
from cross_vocab_models import make_context
from policy_setup import make_job, policy_context, tiny_model, tokenizer, write_policy_job

from dskd.errors import DskdError, ModelError, PluginError
from dskd.models.teacher import LocalTeacher
from dskd.plugins.divergences.forward_kl import forward_kl
from dskd.plugins.objectives.sft import sft
from dskd.plugins.policies.adaptive import adaptive
from dskd.plugins.policies.mixed import mixed
from dskd.plugins.policies.off_policy import off_policy
from dskd.plugins.policies.on_policy import on_policy
from dskd.plugins.policies.teacher_generated import teacher_generated

SAMPLING_POLICIES = {"on_policy": on_policy, "mixed": mixed, "adaptive": adaptive}


def assert_sentence(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message, message
    for fragment in fragments:
        assert fragment in message, message


@pytest.fixture(scope="module")
def context():
    return policy_context("same")


@pytest.mark.parametrize("name", [*SAMPLING_POLICIES, "teacher_generated"])
def test_a_policy_that_needs_a_teacher_refuses_a_run_without_one(context, name):
    factory = {**SAMPLING_POLICIES, "teacher_generated": teacher_generated}[name]
    with pytest.raises(PluginError) as error:
        factory(dataclasses.replace(context, teacher=None))
    assert_sentence(error, f"policy {name}", "teacher", "configure one")


def test_off_policy_needs_nothing(context):
    assert off_policy(dataclasses.replace(context, teacher=None)).state_dict() == {}


def test_teacher_generated_refuses_a_teacher_that_cannot_generate(context):
    scorer = LocalTeacher(tiny_model("tinyllama", 24, seed=1), tokenizer("tinyllama"))
    scorer.capabilities = frozenset({"hidden_states", "top_k", "logits"})  # as a server without Generate reports
    with pytest.raises(PluginError) as error:
        teacher_generated(dataclasses.replace(context, teacher=scorer))
    assert_sentence(error, "teacher_generated", "generate")


@pytest.mark.parametrize(
    "name, options, fragment",
    [
        ("mixed", {"lam": 1.5}, "policy.lam must be in [0.0, 1.0], got 1.5"),
        ("mixed", {"lam": -0.1}, "policy.lam"),
        ("on_policy", {"temperature": 0.0}, "policy.temperature must be > 0 for sampling"),
        ("adaptive", {"temperature": -1.0}, "policy.temperature"),
        ("on_policy", {"top_p": 0.0}, "policy.top_p"),
        ("on_policy", {"max_new_tokens": 0}, "policy.max_new_tokens"),
        ("adaptive", {"max_prob": 1.5}, "policy.max_prob"),
        ("adaptive", {"replay_prob": 2.0}, "policy.replay_prob"),
        ("adaptive", {"buffer_size": -1}, "buffer_size"),
    ],
)
def test_invalid_sampling_options_are_refused(context, name, options, fragment):
    with pytest.raises(PluginError) as error:
        SAMPLING_POLICIES[name](context, **options)
    assert_sentence(error, fragment)


@pytest.mark.parametrize("options", [{"top_p": 0.0}, {"temperature": -0.5}, {"max_new_tokens": 0}])
def test_invalid_teacher_sampling_options_are_refused(context, options):
    with pytest.raises(PluginError) as error:
        teacher_generated(context, **options)
    assert_sentence(error, "teacher_generated")


@pytest.mark.parametrize("name", SAMPLING_POLICIES)
def test_student_samples_are_refused_for_an_objective_that_uses_no_teacher(name):
    context = policy_context("same")
    objective = sft(make_context(context.student, context.teacher, "tinyllama", divergence=forward_kl, same_vocab=True))
    with pytest.raises(PluginError) as error:
        SAMPLING_POLICIES[name](dataclasses.replace(context, objective=objective))
    assert_sentence(error, f"policy {name}", "no teacher signal", "off_policy or teacher_generated")


@pytest.mark.parametrize(
    "policy, options, objective, vocab, error_type, fragments",
    [
        ("mixed", {"lam": 1.5}, "dskd_v2", "same", PluginError, ("policy.lam",)),
        ("on_policy", {"max_new_tokens": 4}, "sft", "same", PluginError, ("objective 'sft'", "no teacher signal")),
        ("on_policy", {"max_new_tokens": 4}, "kd", "different", ModelError, ("objective kd", "cross-tokenizer")),
    ],
)
def test_a_run_with_a_combination_that_cannot_work_stops_at_setup(
    tmp_path, policy, options, objective, vocab, error_type, fragments
):
    job = make_job(write_policy_job(tmp_path, vocab=vocab, objective=objective, policy=policy, options=options))
    with pytest.raises(error_type) as error:
        job.distill(None)
    assert isinstance(error.value, DskdError)
    assert_sentence(error, *fragments)
    assert not (tmp_path / "run" / "metrics.jsonl").exists(), "a step ran before the refusal"
