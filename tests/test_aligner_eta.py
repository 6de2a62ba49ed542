"""ETA on the three real tokenizers: pairs are exactly the tokens whose byte spans coincide (§6.6).

Two independent oracles: the fast tokenizers' character `offset_mapping` mapped to space-stripped
byte offsets (the same spans by another route), and a re-implementation of the reference's greedy
string matching (spec §6.2), which ETA must reproduce where the reference is well defined.
"""

from __future__ import annotations

import pickle
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from dskd.errors import DataError
from dskd.evaluation.alignment_bounds import exact_span_pairs
from dskd.kit.token_bytes import teacher_to_student_map
from dskd.plugins.aligners import eta as eta_module

TOKENIZERS = Path(__file__).resolve().parents[1] / "examples" / "tokenizers"
NAMES = ("gpt2", "tinyllama", "mistral")
PAIRS = [(t, s) for t in NAMES for s in NAMES]


@lru_cache(maxsize=None)
def tokenizer(name: str):
    return AutoTokenizer.from_pretrained(TOKENIZERS / name)


@lru_cache(maxsize=None)
def aligner(teacher: str, student: str, keep_spaces: bool = False):
    return eta_module.eta(tokenizer(teacher), tokenizer(student), keep_spaces=keep_spaces)


def label_ids(name: str, text: str) -> list[int]:
    """What the data pipeline passes: the response tokens followed by EOS."""
    tok = tokenizer(name)
    return tok(text, add_special_tokens=False, split_special_tokens=True).input_ids + [tok.eos_token_id]


def pairs_of(teacher: str, student: str, text: str, **options) -> list[tuple[int, int]]:
    found = aligner(teacher, student, **options).align(label_ids(teacher, text), label_ids(student, text))
    return [tuple(p) for p in found.pairs.tolist()]


# --- oracle 1: spans on the original text from character offsets (`dskd.evaluation.alignment_bounds`, no byte
# tables)


def offset_pairs(teacher: str, student: str, text: str) -> list[tuple[int, int]]:
    found = exact_span_pairs(tokenizer(teacher), tokenizer(student), text)
    n_t, n_s = len(label_ids(teacher, text)), len(label_ids(student, text))
    return found + [(n_t - 1, n_s - 1)]  # both end with EOS


# --- oracle 2: the reference's greedy string matching (spec §6.2)
# ------------------------------------


def greedy_pairs(teacher: str, student: str, text: str) -> list[tuple[int, int]]:
    t_tok, s_tok = tokenizer(teacher), tokenizer(student)
    t_raw = t_tok.convert_ids_to_tokens(label_ids(teacher, text))
    s_raw = s_tok.convert_ids_to_tokens(label_ids(student, text))
    t_norm = [p.replace("▁", "").replace("Ġ", "") for p in t_raw]
    s_norm = [p.replace("▁", "").replace("Ġ", "") for p in s_raw]
    i = j = 0
    t_hist = s_hist = ""
    found = []
    while i < len(t_norm) and j < len(s_norm):
        eos = t_raw[i] == t_tok.eos_token and s_raw[j] == s_tok.eos_token
        if t_hist == s_hist and (t_norm[i] == s_norm[j] or eos):
            found.append((i, j))
            t_hist, s_hist, i, j = t_hist + t_norm[i], s_hist + s_norm[j], i + 1, j + 1
        elif len(t_hist) > len(s_hist):
            s_hist, j = s_hist + s_norm[j], j + 1
        elif len(t_hist) < len(s_hist):
            t_hist, i = t_hist + t_norm[i], i + 1
        else:
            t_hist, s_hist, i, j = t_hist + t_norm[i], s_hist + s_norm[j], i + 1, j + 1
    return found


# Random text with what breaks the reference: newlines, runs of spaces, digits, accents (precomposed
# and combining), CJK, emoji (with joiners, flags), controls. U+2581 is left out: SentencePiece
# reads a literal `▁` as a space, so the two tokenizations no longer spell the same text (tested
# separately below).
FRAGMENTS = [
    "  ",
    "   ",
    "\n",
    "\n\n",
    "\t",
    "\r\n",
    "😀",
    "👩\u200d👧",
    "🇫🇷",
    "日本語",
    "é",
    "e\u0301",
    "ß",
    "€",
    " 42",
    "3.14",
]
TEXT = st.lists(
    st.one_of(
        st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"), max_size=6),
        st.text("abcdefghij ABC.,'0123456789", max_size=8),
        st.sampled_from(FRAGMENTS),
    ),
    max_size=10,
).map("".join)
WORDS = (
    "the quick brown fox jumps over a lazy dog while polygons are drawn, isn't it? Yes! (maybe) co-operate U.S.A."
).split()


@pytest.mark.slow
@pytest.mark.parametrize(("teacher", "student"), PAIRS)
@settings(max_examples=50, deadline=None)
@given(text=TEXT)
def test_pairs_are_exactly_the_tokens_with_equal_byte_spans(teacher, student, text):
    t_ids, s_ids = label_ids(teacher, text), label_ids(student, text)
    found = aligner(teacher, student).align(t_ids, s_ids)
    assert found.pairs.dtype == np.int64 and found.is_monotonic()
    expected = offset_pairs(teacher, student, text)
    assert [tuple(p) for p in found.pairs.tolist()] == expected
    assert tuple(found.pairs[-1]) == (len(t_ids) - 1, len(s_ids) - 1)  # the EOS pair
    t_table, s_table = (
        aligner(teacher, student).teacher.table,
        aligner(teacher, student).student.table,
    )
    for i, j in found.pairs[:-1].tolist():
        t_bytes, s_bytes = t_table.token(t_ids[i]), s_table.token(s_ids[j])
        if t_bytes.strip(b" "):
            assert t_bytes.strip(b" ") == s_bytes.strip(b" ")
        else:  # tokens of spaces only pair with the same spaces
            assert t_bytes == s_bytes != b""


@pytest.mark.parametrize(("teacher", "student"), PAIRS)
@settings(max_examples=40, deadline=None)
@given(words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=25))
def test_on_ascii_text_with_a_shared_alphabet_pairs_equal_the_reference_greedy_pairs(teacher, student, words):
    text = " ".join(words)  # ASCII, single spaces, no newlines: the reference's strings mean the same bytes
    raw = tokenizer(teacher).tokenize(text) + tokenizer(student).tokenize(text)
    # Pure-space tokens normalise to "" in the reference, which then pairs or skips them by
    # position.
    assume(all(p.replace("▁", "").replace("Ġ", "") for p in raw))
    assert pairs_of(teacher, student, text) == greedy_pairs(teacher, student, text)


@pytest.mark.parametrize(("teacher", "student"), PAIRS)
def test_hello_world_aligns_every_token_and_eos(teacher, student):
    assert pairs_of(teacher, student, "Hello world") == [(0, 0), (1, 1), (2, 2)]


def test_a_word_split_differently_is_skipped_and_the_next_token_aligns():
    llama, gpt2 = tokenizer("tinyllama"), tokenizer("gpt2")
    text = " polygon shape"
    assert llama.tokenize(text)[-2:] == ["▁polygon", "▁shape"]
    assert gpt2.tokenize(text) == ["Ġpoly", "gon", "Ġshape"]
    last = len(label_ids("tinyllama", text)) - 1
    # Teacher "▁polygon" against student "Ġpoly", "gon": neither pairs; "shape" and EOS do.
    assert pairs_of("tinyllama", "gpt2", text) == [(last - 1, 2), (last, 3)]
    assert greedy_pairs("tinyllama", "gpt2", text) == pairs_of("tinyllama", "gpt2", text)


def test_alignment_continues_after_an_emoji_where_the_reference_stops():
    text = "I like 😀 emoji and more words after it"
    ours, reference = (
        pairs_of("mistral", "tinyllama", text),
        greedy_pairs("mistral", "tinyllama", text),
    )
    mistral_tokens = tokenizer("mistral").convert_ids_to_tokens(label_ids("mistral", text))
    after = mistral_tokens.index("😀") + 1
    assert all(i < after for i, _ in reference)  # the reference never aligns past the emoji
    assert ours == offset_pairs("mistral", "tinyllama", text)
    assert len([i for i, _ in ours if i >= after]) >= len(mistral_tokens) - after - 1  # all but one word


@pytest.mark.parametrize(("teacher", "student"), [("gpt2", "tinyllama"), ("tinyllama", "gpt2"), ("gpt2", "mistral")])
def test_newlines_spelled_differently_still_align(teacher, student):
    text = "one\ntwo\n\nthree"
    found = pairs_of(teacher, student, text)
    assert found == offset_pairs(teacher, student, text)
    t_raw = tokenizer(teacher).convert_ids_to_tokens(label_ids(teacher, text))
    s_raw = tokenizer(student).convert_ids_to_tokens(label_ids(student, text))
    assert any({t_raw[i], s_raw[j]} == {"Ċ", "<0x0A>"} for i, j in found)


def test_truncated_sequences_align_their_common_text_without_eos():
    text = "The quick brown fox jumps over the lazy dog."
    t_ids, s_ids = label_ids("gpt2", text)[:5], label_ids("mistral", text)
    found = aligner("gpt2", "mistral").align(t_ids, s_ids).pairs.tolist()
    assert found == [[i, j] for i, j in offset_pairs("gpt2", "mistral", text) if i < 5]


def test_alignment_resynchronises_after_a_literal_marker_the_tokenizer_rewrote():
    # SentencePiece reads a literal "▁" as a space, so there the two sides spell different bytes;
    # the words after it still pair (the old aligner stopped at the first differing byte).
    text = "ab x\u2581y cd"
    found = pairs_of("gpt2", "mistral", text)
    t_raw = tokenizer("gpt2").convert_ids_to_tokens(label_ids("gpt2", text))
    assert [t_raw[i] for i, _ in found] == ["ab", "Ġx", "y", "Ġcd", "<|endoftext|>"]
    # On the original text Mistral's "▁y" covers the marker too, so the bound has no ("y", "▁y") pair:
    # ETA finds all the bound's pairs, and that one because Mistral spells the marker as a space.
    bound = offset_pairs("gpt2", "mistral", text)
    assert set(bound) <= set(found) and len(found) == len(bound) + 1


@pytest.mark.parametrize(("teacher", "student"), [("mistral", "tinyllama"), ("tinyllama", "mistral")])
def test_lone_space_tokens_before_digits_pair_as_the_paper_defines(teacher, student):
    # SentencePiece writes "12" as "▁", "1", "2": the three "▁" stand for the same space after the
    # same text on both sides, so every token and EOS pair (the paper's 17; the old default gave 14).
    text = "The total is 12 plus 7, which makes 19."
    t_raw = tokenizer(teacher).convert_ids_to_tokens(label_ids(teacher, text))
    assert t_raw.count("▁") == 3
    found = pairs_of(teacher, student, text)
    assert len(found) == len(t_raw) == 17
    assert found == greedy_pairs(teacher, student, text) == offset_pairs(teacher, student, text)


def test_keep_spaces_compares_spaces_too():
    # "x  1": GPT-2 "x", "Ġ", "Ġ1" against Llama "▁x", "▁▁", "1": "Ġ1" and "1" differ only by a
    # space.
    assert pairs_of("gpt2", "tinyllama", "x  1") == [(0, 0), (2, 2), (3, 3)]
    assert pairs_of("gpt2", "tinyllama", "x  1", keep_spaces=True) == [(0, 0), (3, 3)]
    # "a  b": "a", "Ġ", "Ġb" against "▁a", "▁", "▁b": with spaces kept the space tokens have a span
    # too.
    assert pairs_of("gpt2", "tinyllama", "a  b", keep_spaces=True) == [
        (0, 0),
        (1, 1),
        (2, 2),
        (3, 3),
    ]
    # The space SentencePiece puts before the first word is not part of the text.
    assert pairs_of("gpt2", "mistral", "Hello world", keep_spaces=True) == [(0, 0), (1, 1), (2, 2)]


def test_empty_sequences_and_sequences_without_eos_give_no_eos_pair():
    assert len(aligner("gpt2", "mistral").align([], [])) == 0
    ids_t = tokenizer("gpt2")("Hi there", add_special_tokens=False).input_ids
    ids_s = tokenizer("mistral")("Hi there", add_special_tokens=False).input_ids
    found = aligner("gpt2", "mistral").align(ids_t, ids_s).pairs.tolist()
    assert found and found[-1] == [len(ids_t) - 1, len(ids_s) - 1]  # the last word, not an EOS pair


def test_aligner_accepts_tensors_pickles_and_gives_the_same_pairs_after():
    text = "Ça marche, 日本語 too!\n"
    t_ids, s_ids = label_ids("mistral", text), label_ids("gpt2", text)
    original = aligner("mistral", "gpt2")
    restored = pickle.loads(pickle.dumps(original))
    expected = original.align(t_ids, s_ids).pairs
    assert np.array_equal(restored.align(torch.tensor(t_ids), torch.tensor(s_ids)).pairs, expected)


def test_ids_outside_the_vocabulary_are_refused_with_the_fix():
    with pytest.raises(DataError, match=r"teacher_ids holds id -100.*without the -100 positions"):
        aligner("gpt2", "mistral").align([1, -100], [1])


def test_vocab_map_is_the_top1_map():
    expected = teacher_to_student_map(tokenizer("gpt2"), tokenizer("mistral"))
    assert torch.equal(aligner("gpt2", "mistral").vocab_map(), expected)


def test_module_registers_eta():
    registered = {}
    eta_module.dskd_register_aligners(lambda name, obj: registered.setdefault(name, obj))
    assert registered == {"eta": eta_module.eta}
