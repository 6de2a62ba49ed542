"""`MultiTeacherObjective` (issue 18) against an independent computation: per teacher, its own objective run on a
batch collated from scratch of only the samples it serves (fresh padding, a fresh student forward, a fresh teacher
call), weighted by hand with `weight_i / sum of the serving teachers' weights`; plus the CE of every sample once.
Loss and gradients (student and each teacher's projectors) must agree, for a routed, a weighted and a mixed job.

Two teachers of different tokenizers (Mistral and TinyLlama; tiny random Llamas), a GPT-2-tokenizer student; every
cross-tokenizer objective with its default aligner, and `kd` with two teachers of the student's own tokenizer."""

from __future__ import annotations

import functools

import pytest
import torch.nn.functional as F
from cross_vocab_models import assert_rel, gradients, make_context, tiny_gpt2, tiny_llama, tokenizer

from dskd.config import Config, DataConfig
from dskd.config_teachers import TeacherEntry
from dskd.data.batching import collate
from dskd.data.examples import Example, tokenize_split
from dskd.data.multi_teacher import MultiTeacherDataset, collate_teachers, serving_sets
from dskd.kit.lm_head import head_from_model, last_hidden_state
from dskd.kit.multi_teacher import MultiTeacherObjective
from dskd.kit.objective import student_ce_terms
from dskd.kit.weights import LossWeights, objective_loss
from dskd.models.teacher import LocalTeacher
from dskd.registry import load_registry
from dskd.run.components import bind_divergence

PROMPT = "### Instruction:\n{}\n### Response:\n"
EXAMPLES = [
    Example(PROMPT.format("Add 12 and 30."), ("42",), tags=(("category", "arithmetic/add"),)),
    Example(PROMPT.format("Largest of 3 9 1?"), ("9, of course",), tags=(("category", "list/max"),)),
    Example(PROMPT.format("Subtract 5 from 7."), ("2 wörld",), tags=(("category", "arithmetic/subtract"),)),
    Example(PROMPT.format("Reverse 1 2 3."), ("3 2 1 😀",), tags=(("category", "list/reverse"),)),
    Example(PROMPT.format("Smallest of 4 0?"), ("0",), tags=(("category", "list/min"),)),
]
NAMES = ("mistral", "tinyllama")
KD_RATE = 0.4

CASES = {
    "routed": (
        TeacherEntry("mistral", 1.0, route={"category": ("arithmetic/*",)}),
        TeacherEntry("tinyllama", 1.0, route={"category": ("list/*",)}),
    ),
    "weighted": (TeacherEntry("mistral", 3.0), TeacherEntry("tinyllama", 1.0)),
    # mistral serves every sample, tinyllama the lists: two groups for mistral (weights 1 and 1/3)
    "mixed": (TeacherEntry("mistral", 1.0), TeacherEntry("tinyllama", 2.0, route={"category": ("list/*",)})),
}


# objective -> its aligner (None: the teachers share the student's tokenizer)
OBJECTIVES = {"dskd_v2": "eta", "dskd": None, "dskd_cma": "eta", "uld": "index", "mined_kd": "mined", "kd": None}


def tokenizer_of(objective: str, name: str):
    return tokenizer("gpt2" if OBJECTIVES[objective] is None else name)


@functools.cache
def build(objective_name: str):
    registry = load_registry()
    s_tok = tokenizer("gpt2")
    student = tiny_gpt2(len(s_tok))
    toks = {n: tokenizer_of(objective_name, n) for n in NAMES}
    teachers = {
        "mistral": LocalTeacher(tiny_llama(len(toks["mistral"]), seed=1), toks["mistral"]),
        "tinyllama": LocalTeacher(tiny_llama(len(toks["tinyllama"]), hidden=20, seed=2), toks["tinyllama"]),
    }
    aligner_name = OBJECTIVES[objective_name]
    aligners = {n: aligner_name and registry.get("aligners", aligner_name)(toks[n], s_tok) for n in NAMES}
    divergence = bind_divergence(Config(), registry)
    members = {
        n: registry.get("objectives", objective_name)(
            make_context(
                student,
                teachers[n],
                divergence=divergence,
                temperature=2.0,
                aligner=aligners[n],
                same_vocab=aligner_name is None,
            )
        )
        for n in NAMES
    }
    head = head_from_model(student, len(s_tok), name="student")
    objective = MultiTeacherObjective(members, functools.partial(student_ce_terms, head, chunk_size=4))
    splits = {
        n: tokenize_split(EXAMPLES, s_tok, toks[n], DataConfig(), aligner=aligners[n], split="valid") for n in NAMES
    }
    return student, teachers, objective, splits


@pytest.fixture(scope="module")
def setup():
    return build("dskd_v2")


def composite(setup, entries):
    student, teachers, objective, splits = setup
    dataset = MultiTeacherDataset(splits, serving_sets(entries, EXAMPLES))
    batch = collate_teachers(
        [dataset[i] for i in range(len(dataset))],
        student_pad_id=tokenizer("gpt2").eos_token_id,
        teacher_pad_ids={n: teachers[n].tokenizer.eos_token_id for n in NAMES},
        weights={e.name: e.weight for e in entries},
    )
    hidden = last_hidden_state(student, batch.student_input_ids, batch.student_attention_mask)
    signals = {
        n: teachers[n].score(
            v.batch.teacher_input_ids, v.batch.teacher_attention_mask, v.batch.teacher_rows, objective.requests[n]
        )
        for n, v in batch.teachers.items()
    }
    denominator = float(batch.num_student_tokens())
    loss, terms = objective_loss(objective, batch, hidden, signals, kd_rate=KD_RATE, denominator=denominator)
    return loss, terms, denominator


def independent(setup, entries, denominator):
    """The same loss from the definition: CE of every sample, plus per sample s and teacher i serving it,
    w_i(s) * KD_i(s), each teacher's KD computed by its own objective on a batch of just its samples."""
    student, teachers, objective, splits = setup
    s_tok = tokenizer("gpt2")
    full = collate(
        [splits["mistral"][i] for i in range(len(EXAMPLES))], student_pad_id=s_tok.eos_token_id, teacher_pad_id=0
    )
    logits = student(input_ids=full.student_input_ids, attention_mask=full.student_attention_mask).logits
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), full.student_labels.reshape(-1), reduction="sum")
    total = (1 - KD_RATE) * ce
    raw = {}
    by_name = {e.name: e for e in entries}
    serving = [tuple(e.name for e in entries if e.serves(dict(x.tags))) for x in EXAMPLES]
    for name in NAMES:
        for teachers_of_group in sorted(set(serving)):
            if name not in teachers_of_group:
                continue
            samples = [i for i, s in enumerate(serving) if s == teachers_of_group]
            weight = by_name[name].weight / sum(by_name[t].weight for t in teachers_of_group)
            sub = collate(
                [splits[name][i] for i in samples],
                student_pad_id=s_tok.eos_token_id,
                teacher_pad_id=tokenizer(name).eos_token_id,
            )
            hidden = last_hidden_state(student, sub.student_input_ids, sub.student_attention_mask)
            member = objective.members[name]
            signal = teachers[name].score(
                sub.teacher_input_ids, sub.teacher_attention_mask, sub.teacher_rows, member.request
            )
            kd, terms = objective_loss(member, sub, hidden, signal, weights=LossWeights(ce=0.0, kd=1.0))
            total = total + KD_RATE * weight * kd
            for part, value in terms.parts.items():
                if part != "ce":
                    raw[f"{part}/{name}"] = raw.get(f"{part}/{name}", 0.0) + float(value)
    return total / denominator, raw


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_and_gradients_equal_each_teachers_objective_on_its_own_samples_weighted_by_hand(setup, case):
    check_against_independent(setup, case)


@pytest.mark.slow  # about 40 s on 2 cores (the mined aligner alone takes 15)
@pytest.mark.parametrize("objective", sorted(set(OBJECTIVES) - {"dskd_v2"}))
def test_every_distillation_objective_works_with_two_teachers(objective):
    check_against_independent(build(objective), "mixed")


def check_against_independent(setup, case):
    student, _, objective, _ = setup
    entries = CASES[case]
    params = {f"student.{n}": p for n, p in student.named_parameters()}
    modules = objective.trainable_modules()
    params.update({f"projectors.{n}": p for n, p in modules.named_parameters()} if modules is not None else {})
    loss, terms, denominator = composite(setup, entries)
    expected, raw = independent(setup, entries, denominator)
    assert_rel(loss, expected, 1e-5, f"{case}: loss")
    got, want = gradients(params, loss), gradients(params, expected)
    for name in params:
        assert_rel(got[name], want[name], 1e-4, f"{case}: d loss / d {name}")
    assert set(raw) == {k for k in terms.parts if k != "ce"}  # one part per teacher and term, its own tokens' sum
    for part, value in raw.items():
        assert abs(float(terms.parts[part]) - value) <= 1e-5 * max(1.0, abs(value)), part


def test_a_routed_teacher_is_asked_only_about_its_samples_and_logs_its_align_ratio(setup):
    loss, terms, _ = composite(setup, CASES["routed"])
    assert set(terms.metrics) >= {"align_ratio/mistral", "align_ratio/tinyllama"}
    # Two arithmetic samples for mistral, three lists for tinyllama.
    assert float(terms.counts["align_ratio/mistral"]) > 0 and float(terms.counts["align_ratio/tinyllama"]) > 0


def test_projectors_are_one_module_with_each_teachers_under_its_name(setup):
    _, _, objective, _ = setup
    names = {key.split(".")[0] for key in objective.trainable_modules().state_dict()}
    assert names == set(NAMES)
