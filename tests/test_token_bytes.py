"""Exact token bytes per tokenizer family, and the exact-bytes top-1 map (spec §6.3, §14.7)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dskd.errors import DataError, ModelError
from dskd.kit.token_bytes import (
    BYTE_LEVEL,
    SENTENCEPIECE,
    byte_decoder,
    teacher_to_student_map,
    token_ids,
    vocab_bytes,
)

TOKENIZERS = Path(__file__).resolve().parents[1] / "examples" / "tokenizers"
NAMES = ("gpt2", "tinyllama", "mistral")


@lru_cache(maxsize=None)
def tokenizer(name: str):
    return AutoTokenizer.from_pretrained(TOKENIZERS / name)


@lru_cache(maxsize=None)
def table(name: str):
    return vocab_bytes(tokenizer(name))


@lru_cache(maxsize=None)
def top1(teacher: str, student: str):
    return teacher_to_student_map(tokenizer(teacher), tokenizer(student)).numpy()


# Random text that exercises every way tokenizers split text: runs of spaces, newlines and tabs,
# digits, accents (precomposed and combining), CJK, emoji with joiners and flags, controls. U+2581
# is left out: SentencePiece reads a literal `▁` as a space, so no tokenizer of that family can
# round-trip it.
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
    "ﬁ",
    "\x00",
]
TEXT = st.lists(
    st.one_of(
        st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"), max_size=6),
        st.text("abcdefghij ABC.,'0123456789", max_size=8),
        st.sampled_from(FRAGMENTS),
    ),
    max_size=10,
).map("".join)


def test_byte_decoder_inverts_the_byte_level_alphabet_of_the_tokenizers_library():
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    table_ = byte_decoder()
    assert set(table_) == alphabet
    assert sorted(table_.values()) == list(range(256))
    assert table_["Ġ"] == 0x20 and table_["Ċ"] == 0x0A and table_["A"] == 0x41


@pytest.mark.parametrize(
    ("name", "family", "marker"),
    [("gpt2", BYTE_LEVEL, "Ġ"), ("tinyllama", SENTENCEPIECE, "▁"), ("mistral", SENTENCEPIECE, "▁")],
)
def test_family_is_read_from_the_tokenizer_definition(name, family, marker):
    vb = table(name)
    assert (vb.family, vb.marker, vb.eos_id) == (family, marker, tokenizer(name).eos_token_id)


def test_a_tokenizer_of_neither_family_is_refused_with_the_alternative_named():
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ModelError, match="neither byte-level BPE nor SentencePiece.*identity"):
        vocab_bytes(PreTrainedTokenizerFast(tokenizer_object=wordpiece))


@pytest.mark.parametrize(
    ("name", "piece", "expected"),
    [
        ("gpt2", "Ġworld", b" world"),
        ("gpt2", "Ċ", b"\n"),
        ("gpt2", "ĠcafÃ©", " café".encode()),
        ("gpt2", "Ã", b"\xc3"),  # half of a UTF-8 character
        ("tinyllama", "▁world", b" world"),
        ("tinyllama", "<0x0A>", b"\n"),
        ("tinyllama", "<0xF0>", b"\xf0"),
        ("mistral", "▁café", " café".encode()),
        ("mistral", "😀", "😀".encode()),
    ],
)
def test_pieces_decode_to_their_exact_bytes(name, piece, expected):
    assert table(name).table.token(tokenizer(name).convert_tokens_to_ids(piece)) == expected


@pytest.mark.parametrize("name", NAMES)
def test_special_tokens_stand_for_no_bytes(name):
    tok, vb = tokenizer(name), table(name)
    for i in tok.all_special_ids:
        assert vb.special[i] and vb.table.token(i) == b""


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=60, deadline=None)
@given(text=TEXT)
def test_token_bytes_of_any_text_concatenate_to_that_text(name, text):
    tok, vb = tokenizer(name), table(name)
    ids = np.array(tok(text, add_special_tokens=False).input_ids, dtype=np.int64)
    stream, lengths = vb.table.gather(ids)
    # SentencePiece adds a space before the first word, TinyLlama's Metaspace also eats a leading
    # one: compare the text without its leading spaces, which is how ETA compares when it keeps
    # spaces.
    assert stream.tobytes().lstrip(b" ") == text.encode().lstrip(b" ")
    assert lengths.sum() == stream.size
    stripped, _ = vb.table.without_spaces().gather(ids)
    assert stripped.tobytes() == text.encode().replace(b" ", b"")


def test_gather_of_an_empty_sequence_is_empty():
    stream, lengths = table("gpt2").table.gather(np.zeros(0, dtype=np.int64))
    assert stream.size == 0 and lengths.size == 0


@pytest.mark.slow
@pytest.mark.parametrize("teacher", NAMES)
@pytest.mark.parametrize("student", NAMES)
def test_top1_map_sends_each_teacher_token_to_the_student_token_with_the_same_bytes_or_to_minus_one(teacher, student):
    t, s, mapping = table(teacher), table(student), top1(teacher, student)
    assert mapping.shape == (t.size,) and mapping.dtype == np.int64
    student_bytes = {s.table.token(i) for i in range(s.size) if not s.special[i]}
    for i in range(t.size):
        if i == t.eos_id:
            assert mapping[i] == s.eos_id
        elif t.special[i]:
            assert mapping[i] == -1
        elif mapping[i] >= 0:
            assert not s.special[mapping[i]] and s.table.token(int(mapping[i])) == t.table.token(i)
        else:
            assert t.table.token(i) not in student_bytes


@pytest.mark.slow
def test_top1_map_sends_unknown_predictions_to_minus_one_where_the_reference_picks_unk_or_eos():
    gpt2, llama, mistral = tokenizer("gpt2"), tokenizer("tinyllama"), tokenizer("mistral")
    # " café" is one GPT-2 token but two Llama tokens; the reference's raw lookup gives Llama's
    # <unk>.
    cafe = gpt2.convert_tokens_to_ids("ĠcafÃ©")
    assert llama.convert_tokens_to_ids("ĠcafÃ©") == llama.unk_token_id
    assert top1("gpt2", "tinyllama")[cafe] == -1
    # "日" is one Mistral token but three GPT-2 byte tokens; the raw lookup gives GPT-2's EOS.
    sun = mistral.convert_tokens_to_ids("日")
    assert gpt2.convert_tokens_to_ids("日") == gpt2.eos_token_id
    assert top1("mistral", "gpt2")[sun] == -1
    assert top1("gpt2", "mistral")[cafe] == mistral.convert_tokens_to_ids("▁café")


def test_top1_map_sends_eos_to_eos_and_other_specials_to_minus_one():
    gpt2, llama, mistral = tokenizer("gpt2"), tokenizer("tinyllama"), tokenizer("mistral")
    assert top1("gpt2", "tinyllama")[gpt2.eos_token_id] == llama.eos_token_id
    assert top1("mistral", "gpt2")[mistral.eos_token_id] == gpt2.eos_token_id
    assert top1("mistral", "tinyllama")[mistral.bos_token_id] == -1
    assert top1("mistral", "tinyllama")[mistral.unk_token_id] == -1


def test_top1_map_crosses_spellings_and_keeps_word_starts_apart():
    gpt2, llama = tokenizer("gpt2"), tokenizer("tinyllama")
    mapping = top1("gpt2", "tinyllama")
    assert mapping[gpt2.convert_tokens_to_ids("Ċ")] == llama.convert_tokens_to_ids("<0x0A>")
    assert mapping[gpt2.convert_tokens_to_ids("Ġworld")] == llama.convert_tokens_to_ids("▁world")
    assert mapping[gpt2.convert_tokens_to_ids("world")] == llama.convert_tokens_to_ids("world")
    # `A` and the byte-fallback piece `<0x41>` have the same bytes: the map picks the piece the
    # tokenizer emits.
    assert top1("tinyllama", "mistral")[llama.convert_tokens_to_ids("<0x41>")] == tokenizer(
        "mistral"
    ).convert_tokens_to_ids("A")


@pytest.mark.slow
def test_top1_map_pads_to_a_larger_model_vocabulary_and_refuses_a_smaller_one():
    padded = teacher_to_student_map(tokenizer("mistral"), tokenizer("tinyllama"), num_teacher_ids=32064)
    assert padded.shape == (32064,) and bool((padded[32000:] == -1).all())
    with pytest.raises(ModelError, match="31000 output ids but its tokenizer has 32000"):
        teacher_to_student_map(tokenizer("mistral"), tokenizer("tinyllama"), num_teacher_ids=31000)


def test_token_ids_names_the_bad_id_and_the_fix():
    assert token_ids([1, 2], 10, "teacher_ids").dtype == np.int64
    with pytest.raises(DataError, match=r"teacher_ids holds id -100, outside .*\[0, 10\).*without the -100"):
        token_ids([3, -100], 10, "teacher_ids")
    with pytest.raises(DataError, match=r"student_ids holds id 10"):
        token_ids([10], 10, "student_ids")
    with pytest.raises(DataError, match=r"\(1-D\), got shape \(1, 2\)"):
        token_ids([[1, 2]], 10, "student_ids")
