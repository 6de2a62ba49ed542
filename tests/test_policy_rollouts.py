"""`Rollouts`: sampled responses -> training batches, on real tokenizers, built from a real collated batch.

Three pairs (student, teacher): one shared vocabulary (TinyLlama/TinyLlama), the default job's pair (GPT-2
student, Mistral teacher), and a SentencePiece student with a byte-level teacher (TinyLlama student, GPT-2
teacher), where decoding a continuation alone loses its leading space and GPT-2 merges the prompt's last "\\n"
with a sample's leading newlines into one token. Every expectation is computed independently of `Rollouts`: ids
from the data loader's own tokenisation, texts from the tokens' exact bytes.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
from cross_vocab_models import EXAMPLES
from policy_setup import CFG, PAIRS, example_batch, policy_context, text_bytes, tokenizer

from dskd.data.examples import encode_example
from dskd.kit.policy import PolicyContext
from dskd.kit.rollout import Rollouts, split_step
from dskd.types import IGNORE_INDEX

# One response per example of `EXAMPLES` (whose prompts end with "\n"): a leading space (a SentencePiece
# word-start piece), two leading newlines (GPT-2 merges them with the prompt's last one), non-ASCII text, an emoji.
TEXTS = (" Hello wörld\n42 ok", "\n\nAnswer: 😀 done", " Привет")


@dataclasses.dataclass
class Setup:
    student: str
    teacher: str
    rollouts: Rollouts
    batch: object  # the data loader's batch of EXAMPLES

    @property
    def same(self) -> bool:
        return self.student == self.teacher

    def prompt_ids(self, side: str, b: int) -> list[int]:
        ids = getattr(self.batch, f"{side}_input_ids")
        return ids[b, : int(getattr(self.batch, f"{side}_prompt_lengths")[b])].tolist()


@functools.cache
def setup(pair: str, max_length: int = CFG.max_length) -> Setup:
    context: PolicyContext = policy_context(pair, max_length=max_length)
    return Setup(*PAIRS[pair], Rollouts(context), example_batch(pair))


def continuation(s: Setup, b: int, text: str) -> list[int]:
    """Student ids that stand exactly for `text` after prompt b: the data loader's joint tokenisation."""
    ids, prompt_len = encode_example(tokenizer(s.student), EXAMPLES[b].prompt, text, CFG, split_straddling=True)
    out = ids[prompt_len:-1]
    assert text_bytes(s.student, out) == text.encode(), "setup: the chosen continuation is not the text"
    return out


def sequence(batch, side: str, b: int) -> list[int]:
    """The whole id sequence of row b (inputs are ids[:-1]; the last id is the last label)."""
    ids, mask, labels = (getattr(batch, f"{side}_{k}") for k in ("input_ids", "attention_mask", "labels"))
    n = int(mask[b].sum())
    return ids[b, :n].tolist() + [int(labels[b, n - 1])]


def assert_labels(batch, side: str, b: int, prompt_len: int, full: list[int]) -> None:
    """-100 on every prompt position and on padding; the response tokens (and EOS, if any) elsewhere."""
    labels = getattr(batch, f"{side}_labels")[b]
    n = len(full) - 1
    assert int(getattr(batch, f"{side}_prompt_lengths")[b]) == prompt_len
    assert (labels[: prompt_len - 1] == IGNORE_INDEX).all(), f"{side}: a prompt position carries a label"
    assert labels[prompt_len - 1 : n].tolist() == full[prompt_len:]
    assert (labels[n:] == IGNORE_INDEX).all(), f"{side}: a padding position carries a label"


def assert_alignment_pairs_same_text(s: Setup, batch) -> None:
    """Every alignment row pairs a teacher and a student label with identical bytes (or EOS with EOS)."""
    if s.same:
        assert batch.alignment is None
        return
    assert batch.alignment is not None and batch.alignment.shape[0] > 0
    s_eos, t_eos = tokenizer(s.student).eos_token_id, tokenizer(s.teacher).eos_token_id
    for b, t, p in batch.alignment.tolist():
        t_id, s_id = int(batch.teacher_labels[b, t]), int(batch.student_labels[b, p])
        assert t_id != IGNORE_INDEX and s_id != IGNORE_INDEX, "a pair sits on a prompt or padding position"
        if t_id == t_eos or s_id == s_eos:
            assert (t_id, s_id) == (t_eos, s_eos), "EOS paired with text"
        else:
            assert text_bytes(s.teacher, [t_id]) == text_bytes(s.student, [s_id]), (b, t, p)


@pytest.mark.slow
@pytest.mark.parametrize("pair", PAIRS)
def test_student_samples_keep_the_sampled_ids_and_the_teacher_gets_the_same_text(pair):
    s = setup(pair)
    eos = tokenizer(s.student).eos_token_id
    chosen = [continuation(s, 0, TEXTS[0]) + [eos], continuation(s, 1, TEXTS[1]), []]  # ended, cut, empty
    out = s.rollouts.from_student_samples(s.batch, chosen)
    expected_texts = [TEXTS[0], TEXTS[1], ""]
    for b, (cont, ended) in enumerate(zip(chosen, (True, False, True))):
        prompt = s.prompt_ids("student", b)
        full = prompt + (cont or [eos])
        assert sequence(out, "student", b) == full, "student ids are not prompt + sampled ids"
        assert_labels(out, "student", b, len(prompt), full)
        assert (eos in out.student_labels[b].tolist()) == ended
        t_full = sequence(out, "teacher", b)
        t_prompt = int(out.teacher_prompt_lengths[b])
        t_eos = tokenizer(s.teacher).eos_token_id
        if s.same:
            assert t_full == full and t_prompt == len(prompt)
        else:
            joint, joint_prompt = encode_example(
                tokenizer(s.teacher), EXAMPLES[b].prompt, expected_texts[b], CFG, split_straddling=True
            )
            assert (t_full, t_prompt) == (joint if ended else joint[:-1], joint_prompt)
            # The prompt exactly as the data loader gave it to the teacher, the response exactly the sampled text.
            assert t_full[:t_prompt] == s.prompt_ids("teacher", b)
            assert text_bytes(s.teacher, [i for i in t_full[t_prompt:] if i != t_eos]) == expected_texts[b].encode()
        assert_labels(out, "teacher", b, t_prompt, t_full)
        assert (t_eos in out.teacher_labels[b].tolist()) == ended, "teacher and student disagree on the EOS label"
    assert_alignment_pairs_same_text(s, out)
    assert out.sample_ids.tolist() == s.batch.sample_ids.tolist()


def test_a_sampled_newline_after_the_prompts_newline_is_split_for_a_byte_level_teacher():
    s = setup("sentencepiece_student")
    gpt2 = tokenizer("gpt2")
    assert "ĊĊ" in gpt2.convert_ids_to_tokens(gpt2(EXAMPLES[1].prompt + TEXTS[1])["input_ids"]), (
        "setup: no merged newline"
    )
    out = s.rollouts.from_student_samples(s.batch, [[], continuation(s, 1, TEXTS[1]), []])
    t_prompt = int(out.teacher_prompt_lengths[1])
    t_full = sequence(out, "teacher", 1)
    assert t_full[:t_prompt] == s.prompt_ids("teacher", 1)
    assert gpt2.convert_ids_to_tokens(t_full[t_prompt]) == "Ċ"
    assert text_bytes("gpt2", t_full[t_prompt:]) == TEXTS[1].encode()


@pytest.mark.parametrize("pair", PAIRS)
def test_teacher_texts_are_tokenised_jointly_on_both_sides(pair):
    s = setup(pair)
    ended = (True, False, True)
    out = s.rollouts.from_texts(s.batch, TEXTS, ended)
    for b, (text, done) in enumerate(zip(TEXTS, ended)):
        for side, name in (("student", s.student), ("teacher", s.teacher)):
            tok = tokenizer(name)
            ids, prompt_len = encode_example(tok, EXAMPLES[b].prompt, text, CFG, split_straddling=True)
            full = ids if done else ids[:-1]
            assert sequence(out, side, b) == full
            assert_labels(out, side, b, prompt_len, full)
            assert (tok.eos_token_id in getattr(out, f"{side}_labels")[b].tolist()) == done
    assert_alignment_pairs_same_text(s, out)


@pytest.mark.parametrize("pair", ["same", "different"])
def test_a_sample_cut_at_max_length_has_no_eos_label_on_either_side(pair):
    longest_prompt = int(setup(pair).batch.student_prompt_lengths.max())
    s = setup(pair, max_length=longest_prompt + 3)
    eos = tokenizer(s.student).eos_token_id
    chosen = [continuation(s, b, TEXTS[b]) + [eos] for b in range(3)]
    out = s.rollouts.from_student_samples(s.batch, chosen)
    t_eos = tokenizer(s.teacher).eos_token_id
    for b in range(3):
        prompt = s.prompt_ids("student", b)
        room = s.rollouts.data.max_length - len(prompt)
        assert sequence(out, "student", b) == prompt + chosen[b][:room]
        if len(chosen[b]) > room:
            assert eos not in out.student_labels[b].tolist() and t_eos not in out.teacher_labels[b].tolist()
        assert len(sequence(out, "teacher", b)) <= s.rollouts.data.max_length
    assert_alignment_pairs_same_text(s, out)


def test_split_step_trains_the_ce_on_the_gold_batch_and_the_kd_on_the_samples():
    s = setup("same")
    sampled = s.rollouts.from_student_samples(s.batch, [[], [], []])
    source = dataclasses.replace(s.batch)  # split_step marks its batches; the shared one stays as it is
    gold, kd_only = split_step(source, sampled, ce_on_gold=True)
    assert (gold is source, gold.ce, gold.kd) == (True, True, False)
    assert (kd_only is sampled, kd_only.ce, kd_only.kd) == (True, False, True)
    again = s.rollouts.from_student_samples(s.batch, [[], [], []])
    assert [(b.ce, b.kd) for b in split_step(dataclasses.replace(s.batch), again, ce_on_gold=False)] == [(False, True)]


def test_max_new_tokens_leaves_room_for_the_longest_prompt():
    s = setup("same")
    longest = int(s.batch.student_prompt_lengths.max())
    assert s.rollouts.max_new_tokens(s.batch, 1000) == CFG.max_length - longest
    assert s.rollouts.max_new_tokens(s.batch, 6) == 6
    tight = setup("same", max_length=longest)
    assert tight.rollouts.max_new_tokens(tight.batch, 6) == 1
