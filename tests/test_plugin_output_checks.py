"""What a divergence or an aligner returns is checked against its contract (ARCHITECTURE §3), and a breach is one
line naming the plugin and its package, not a silent run or a traceback deep in an objective.

The plugins are those of `tests/broken_plugins_src/dskd_broken_plugins`: in process through `extra_plugins`
(package: "(in process)"), and as the installed distribution `dskd-broken-plugins` in `dskd run` subprocesses.
"""

from __future__ import annotations

import dataclasses
import pickle
import sys

import pytest
import torch
from broken_plugins import PACKAGE, PLUGIN, SOURCE, error_lines, installed_env, run_dskd
from policy_setup import example_batch, policy_context, tokenizer
from tiny_job import write_job

import dskd
from dskd.config import AlignerConfig, Config, DivergenceConfig
from dskd.errors import PluginError
from dskd.kit.rollout import Rollouts
from dskd.registry import load_registry
from dskd.run.components import bind_divergence, build_aligner


@pytest.fixture(scope="module")
def registry():
    sys.path.insert(0, str(SOURCE))
    try:
        import dskd_broken_plugins

        yield load_registry(extra_plugins=[dskd_broken_plugins])
    finally:
        sys.path.remove(str(SOURCE))
        sys.modules.pop("dskd_broken_plugins", None)


def _divergence(registry, name: str):
    return bind_divergence(dataclasses.replace(Config(), divergence=DivergenceConfig(name=name)), registry)


def _logits(rows: int = 5, vocab: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(rows, vocab, generator=generator, requires_grad=True)
    return student, torch.randn(rows, vocab, generator=generator)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        (
            "mean_kl",
            r"returned shape \(\) \(a scalar: drop the \.mean\(\) or \.sum\(\) over rows\) for \(5, 11\) logits",
        ),
        ("vocab_kl", r"returned shape \(5, 11\) for \(5, 11\) logits"),
    ],
)
def test_a_divergence_of_the_wrong_shape_is_named_with_its_package_on_its_first_call(registry, name, problem):
    divergence = _divergence(registry, name)
    with pytest.raises(
        PluginError,
        match=rf"^divergence '{name}' \(plugin 'dskd_broken_plugins', package '\(in process\)'\) {problem}; "
        r"a divergence returns the per-row loss, a float tensor of shape \(5,\)",
    ):
        divergence(*_logits(), temperature=1.0)


def test_a_divergence_detached_from_the_student_or_not_a_tensor_is_named(registry):
    class Careless:
        @staticmethod
        def detached(student_logits, teacher_logits, *, temperature=1.0):
            return (student_logits.detach() - teacher_logits).abs().sum(-1)

        @staticmethod
        def as_list(student_logits, teacher_logits, *, temperature=1.0):
            return (student_logits - teacher_logits).abs().sum(-1).tolist()

        @staticmethod
        def as_integers(student_logits, teacher_logits, *, temperature=1.0):
            return (student_logits - teacher_logits).argmax(-1)

        @dskd.hookimpl
        def dskd_register_divergences(self, register):
            for name in ("detached", "as_list", "as_integers"):
                register(name, getattr(self, name))

    careless = load_registry(extra_plugins=[Careless()], entry_points=False)
    with pytest.raises(
        PluginError, match=r"^divergence 'detached' \(plugin 'Careless-0', .*detached from the student's logits"
    ):
        _divergence(careless, "detached")(*_logits(), temperature=1.0)
    with pytest.raises(PluginError, match=r"^divergence 'as_list' .* returned list for \(5, 11\) logits"):
        _divergence(careless, "as_list")(*_logits(), temperature=1.0)
    with pytest.raises(PluginError, match=r"^divergence 'as_integers' .* returned dtype torch.int64"):
        _divergence(careless, "as_integers")(*_logits(), temperature=1.0)


def test_a_conforming_divergence_passes_and_keeps_its_capabilities(registry):
    divergence = _divergence(registry, "forward_kl")
    student, teacher = _logits()
    loss = divergence(student, teacher, temperature=2.0)
    assert loss.shape == (5,) and loss.requires_grad
    assert divergence.accepts_sparse_teacher is True


def _aligner(registry, fault: str, teacher: str = "mistral", student: str = "gpt2"):
    config = dataclasses.replace(Config(), aligner=AlignerConfig(name="broken", options={"fault": fault}))
    return build_aligner(config, registry, tokenizer(teacher), tokenizer(student), False)


@pytest.mark.parametrize(
    ("fault", "problem"),
    [
        ("past_end", "a position past the end"),
        ("reversed", "pairs that are not strictly increasing"),
        ("negative", r"a negative position \(-1\)"),
    ],
)
@pytest.mark.slow
def test_aligner_pairs_on_student_samples_are_checked_and_name_the_plugin(registry, fault, problem):
    # The on-policy path: the student's sampled ids, re-tokenised for the teacher and aligned by the plugin.
    context = dataclasses.replace(policy_context("different"), aligner=_aligner(registry, fault))
    rollouts = Rollouts(context)
    batch = example_batch("different")
    samples = [tokenizer("gpt2").encode(" a sampled answer") for _ in range(len(batch.sample_ids))]
    with pytest.raises(
        PluginError,
        match=rf"^aligner 'broken' \(plugin 'dskd_broken_plugins', package '\(in process\)'\) returned {problem}",
    ):
        rollouts.from_student_samples(batch, samples)


def test_a_wrapped_aligner_keeps_its_attributes_and_fingerprint(registry):
    from dskd.data.examples import aligner_fingerprint

    built = _aligner(registry, "past_end")
    assert built.fault == "past_end"
    eta = build_aligner(
        dataclasses.replace(Config(), aligner=AlignerConfig(name="eta")),
        registry,
        tokenizer("mistral"),
        tokenizer("gpt2"),
        False,
    )
    raw = registry.get("aligners", "eta")(tokenizer("mistral"), tokenizer("gpt2"))
    assert aligner_fingerprint(eta) == aligner_fingerprint(raw)  # the data cache of an unwrapped aligner stays valid
    assert torch.equal(eta.vocab_map(), raw.vocab_map())
    # Data-loader workers receive it pickled; the copy still checks, and still names the plugin.
    copy = pickle.loads(pickle.dumps(built))
    with pytest.raises(PluginError, match=r"^aligner 'broken' \(plugin 'dskd_broken_plugins'"):
        copy.align([1, 2, 3], [4, 5])


@pytest.mark.integration
@pytest.mark.parametrize("name", ["mean_kl", "vocab_kl"])
def test_dskd_run_names_a_divergence_of_the_wrong_shape_in_one_line(tmp_path, name):
    write_job(tmp_path, objective="dskd_v2", steps=2)
    result = run_dskd(
        "run", "job.toml", "--set", f"divergence.name={name}", env=installed_env(tmp_path / "site"), cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith(
        f"dskd: error: divergence '{name}' (plugin '{PLUGIN}', package '{PACKAGE}') returned shape"
    ), lines
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.integration
def test_dskd_run_names_an_aligner_whose_pairs_break_the_contract(tmp_path):
    from policy_setup import write_policy_job

    write_policy_job(
        tmp_path, vocab="different", objective="uld", extra='\n[aligner]\nname = "broken"\nfault = "reversed"\n'
    )
    result = run_dskd("run", "job.toml", env=installed_env(tmp_path / "site"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith(
        f"dskd: error: aligner 'broken' (plugin '{PLUGIN}', package '{PACKAGE}') returned pairs that are not strictly increasing"
    ), lines
