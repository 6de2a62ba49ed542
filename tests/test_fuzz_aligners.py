"""Every registered aligner, fuzzed on the real tokenizer pairs: no crash, and the aligner contract holds.

The contract (ARCHITECTURE §3): `align(teacher_ids, student_ids)` returns `(K, 2)` int64 pairs of positions
inside the two sequences, both columns strictly increasing. It must hold for any input, not only for two
tokenizations of one text: random ids (unrelated sequences, lengths 0 and 1, repeated ids, specials) and random
Unicode text (control characters, combining marks, emoji, scripts the tokenizers byte-fall-back on). Ids outside
a vocabulary must be refused with a `DataError`, never an IndexError from deep inside.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from dskd.errors import DataError
from dskd.registry import load_registry

TOKENIZERS = Path(__file__).resolve().parents[1] / "examples" / "tokenizers"
REGISTRY = load_registry()
ALIGNERS = sorted(REGISTRY.family("aligners"))
CROSS = [("gpt2", "tinyllama"), ("mistral", "gpt2"), ("tinyllama", "mistral")]
SAME = [("tinyllama", "tinyllama"), ("gpt2", "gpt2")]
# identity is only defined for one vocabulary (it refuses two, see test_aligner_identity.py).
CASES = [(name, t, s) for name in ALIGNERS for t, s in (SAME if name == "identity" else CROSS + SAME[:1])]
FUZZ = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
# Real tokenizer tables and the mined aligner's edit-distance map: CI's `-m ""` runs these, plain `pytest` not.
pytestmark = pytest.mark.slow


@cache
def tokenizer(name: str):
    return AutoTokenizer.from_pretrained(TOKENIZERS / name)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("aligner-cache")


_BUILT: dict[tuple[str, str, str], object] = {}


def aligner(name: str, teacher: str, student: str, cache_dir: Path):
    key = (name, teacher, student)
    if key not in _BUILT:
        options = {"cache_dir": str(cache_dir)} if name == "mined" else {}  # the map cache, kept out of ~/.cache
        _BUILT[key] = REGISTRY.get("aligners", name)(tokenizer(teacher), tokenizer(student), **options)
    return _BUILT[key]


def check_contract(pairs: np.ndarray, teacher_len: int, student_len: int) -> None:
    assert pairs.dtype == np.int64 and pairs.ndim == 2 and pairs.shape[1] == 2
    if len(pairs):
        assert pairs[:, 0].min() >= 0 and pairs[:, 0].max() < teacher_len
        assert pairs[:, 1].min() >= 0 and pairs[:, 1].max() < student_len
        assert np.all(np.diff(pairs, axis=0) > 0), pairs  # both columns strictly increasing


def ids_of(name: str, vocab: int):
    """Random ids of one vocabulary, biased towards the edges and the special tokens."""
    tok = tokenizer(name)
    specials = sorted(
        {i for i in (tok.eos_token_id, tok.bos_token_id, tok.unk_token_id, 0, vocab - 1) if i is not None}
    )
    return st.lists(st.one_of(st.integers(0, vocab - 1), st.sampled_from(specials)), max_size=48)


def label_ids(name: str, text: str) -> list[int]:
    """What the data pipeline aligns: the text's tokens followed by EOS."""
    tok = tokenizer(name)
    return tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]


TEXT = st.text(st.characters(codec="utf-8"), max_size=60) | st.sampled_from(
    [
        "",
        " ",
        "\n\n",
        "\t x",
        "naïve café",
        "日本語のテキスト",
        "emoji 🙂👍🏽 mix",
        "a\u0301\u0302",
        "\u200b\u200d",
        "▁Ġ<0x0A>",
        "</s><s><|endoftext|>",
    ]
)


@pytest.mark.parametrize(("name", "teacher", "student"), CASES)
def test_random_id_sequences_never_break_the_contract(name, teacher, student, cache_dir):
    align = aligner(name, teacher, student, cache_dir)
    t_vocab, s_vocab = len(tokenizer(teacher)), len(tokenizer(student))

    @FUZZ
    @given(t_ids=ids_of(teacher, t_vocab), s_ids=ids_of(student, s_vocab), as_array=st.booleans())
    def check(t_ids, s_ids, as_array):
        args = (np.asarray(t_ids, dtype=np.int64), np.asarray(s_ids, dtype=np.int64)) if as_array else (t_ids, s_ids)
        check_contract(align.align(*args).pairs, len(t_ids), len(s_ids))

    check()


@pytest.mark.parametrize(("name", "teacher", "student"), CASES)
def test_random_unicode_text_never_breaks_the_contract(name, teacher, student, cache_dir):
    align = aligner(name, teacher, student, cache_dir)

    @FUZZ
    @given(text=TEXT)
    def check(text):
        t_ids, s_ids = label_ids(teacher, text), label_ids(student, text)
        pairs = align.align(t_ids, s_ids).pairs
        check_contract(pairs, len(t_ids), len(s_ids))
        if teacher == student:  # one tokenization: every aligner that pairs by text pairs each token with itself
            assert np.all(pairs[:, 0] == pairs[:, 1])

    check()


@pytest.mark.parametrize(("name", "teacher", "student"), CASES)
def test_ids_outside_the_vocabulary_are_refused_with_a_data_error(name, teacher, student, cache_dir):
    align = aligner(name, teacher, student, cache_dir)
    t_vocab, s_vocab = len(tokenizer(teacher)), len(tokenizer(student))
    bad = st.sampled_from([-1, -(2**31), 2**31 - 1]) | st.integers(max(t_vocab, s_vocab), 2**40)

    @FUZZ
    @given(
        good_t=ids_of(teacher, t_vocab),
        good_s=ids_of(student, s_vocab),
        wrong=bad,
        side=st.sampled_from(["teacher", "student"]),
        data=st.data(),
    )
    def check(good_t, good_s, wrong, side, data):
        t_ids, s_ids = list(good_t), list(good_s)
        target = t_ids if side == "teacher" else s_ids
        target.insert(data.draw(st.integers(0, len(target))), wrong)
        with pytest.raises(DataError) as info:
            align.align(t_ids, s_ids)
        assert "\n" not in str(info.value)

    check()
