"""`teacher_generated`: teacher samples are generated once, cached on disk under the teacher's fingerprint and
the sampling settings, read back by later runs without new generate calls, and never by another teacher."""

from __future__ import annotations

import dataclasses

import pytest
from policy_setup import PAIRS, PROMPTS, example_batch, policy_context, text_bytes, tiny_model, tokenizer

from dskd.models.teacher import LocalTeacher
from dskd.plugins.policies.teacher_generated import teacher_generated

SETTINGS = {"max_new_tokens": 5, "temperature": 1.0}


class CountingTeacher(LocalTeacher):
    """A local teacher that records every `generate` call (its prompts and its samples)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[list[list[int]], list[list[int]]]] = []

    def generate(self, prompts, **kwargs):
        samples = super().generate(prompts, **kwargs)
        self.calls.append((prompts, samples))
        return samples


def teacher(name: str, seed: int) -> CountingTeacher:
    return CountingTeacher(tiny_model(name, 24, seed=seed), tokenizer(name))


def prepare(pair: str, teacher_, cache_dir, **settings):
    policy = teacher_generated(
        policy_context(pair, teacher=teacher_, cache_dir=str(cache_dir)), **{**SETTINGS, **settings}
    )
    [batch] = policy.prepare(dataclasses.replace(example_batch(pair), meta={}), 0)  # one batch of teacher samples
    return policy, batch


@pytest.mark.slow
@pytest.mark.parametrize("pair", ["same", "different"])
def test_a_second_run_reads_the_samples_from_the_cache_without_generating(tmp_path, pair):
    first_teacher = teacher(PAIRS[pair][1], seed=1)
    policy, first = prepare(pair, first_teacher, tmp_path)
    assert len(first_teacher.calls) == 1 and len(first_teacher.calls[0][0]) == len(PROMPTS)
    assert policy.path.parent == tmp_path and policy.path.is_file()
    assert first.meta["policy"] == "teacher_generated"
    policy.prepare(dataclasses.replace(example_batch(pair), meta={}), 1)
    assert len(first_teacher.calls) == 1, "a sample was generated twice in one run"

    same_teacher = teacher(PAIRS[pair][1], seed=1)
    assert same_teacher.fingerprint == first_teacher.fingerprint
    _, second = prepare(pair, same_teacher, tmp_path)
    assert same_teacher.calls == []
    for name in ("student_input_ids", "student_labels", "teacher_input_ids", "teacher_labels"):
        assert getattr(second, name).tolist() == getattr(first, name).tolist(), name


def test_the_batch_holds_the_teachers_samples_with_an_eos_label_only_where_the_teacher_stopped(tmp_path):
    t = teacher("tinyllama", seed=1)
    _, out = prepare("same", t, tmp_path, max_new_tokens=3)
    [(prompts, samples)] = t.calls
    eos = tokenizer("tinyllama").eos_token_id
    for b, sample in enumerate(samples):
        ended = bool(sample) and sample[-1] == eos
        labels = [i for i in out.teacher_labels[b].tolist() if i != -100]
        assert (eos in labels) == ended
        text = [i for i in sample if i != eos]
        assert text_bytes("tinyllama", [i for i in labels if i != eos]) == text_bytes("tinyllama", text)
    assert any(not (s and s[-1] == eos) for s in samples), "setup: every sample ended; nothing unfinished was checked"


@pytest.mark.slow
def test_another_teacher_or_other_settings_never_read_the_cache(tmp_path):
    first = teacher("tinyllama", seed=1)
    policy, _ = prepare("same", first, tmp_path)
    other = teacher("tinyllama", seed=7)
    assert other.fingerprint != first.fingerprint
    other_policy, _ = prepare("same", other, tmp_path)
    assert len(other.calls) == 1 and other_policy.path != policy.path
    again = teacher("tinyllama", seed=1)
    longer, _ = prepare("same", again, tmp_path, max_new_tokens=6)
    assert len(again.calls) == 1 and longer.path not in (policy.path, other_policy.path)


def test_a_sample_cut_off_by_an_interrupted_write_is_generated_again_alone(tmp_path):
    first = teacher("tinyllama", seed=1)
    policy, whole = prepare("same", first, tmp_path)
    lines = policy.path.read_text(encoding="utf-8").splitlines()
    policy.path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2], encoding="utf-8")
    again = teacher("tinyllama", seed=1)
    _, resumed = prepare("same", again, tmp_path)
    assert [len(prompts) for prompts, _ in again.calls] == [1]
    assert resumed.student_input_ids.shape[0] == whole.student_input_ids.shape[0]
