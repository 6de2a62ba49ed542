"""MinED (spec §9.1) against slow pure-Python references.

DTW and nearest-string search against cell-by-cell versions, the vocabulary map against brute force,
the alignment against the reference's per-sample procedure; and the disk cache of the map.
"""

from __future__ import annotations

import math
import pickle
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dskd.kit.token_bytes import exact_byte_map, vocab_bytes
from dskd.plugins.aligners import mined as mined_module
from dskd.plugins.aligners._edit_distance import dtw_path, nearest_strings
from dskd.plugins.aligners.mined import MinEditAligner

TOKENIZERS = Path(__file__).resolve().parents[1] / "examples" / "tokenizers"
CORPUS = [
    "the cat sat on the mat. the dog sat on the log.",
    "distillation moves knowledge from a large teacher to a small student model.",
    "tokenizers split words into pieces: some long, some short, some in between!",
] * 3


@lru_cache(maxsize=None)
def tokenizer(name: str):
    return AutoTokenizer.from_pretrained(TOKENIZERS / name)


@lru_cache(maxsize=None)
def tiny(kind: str):
    """A small tokenizer trained here: `byte_level` (GPT-2 style) or `sentencepiece` (Llama)."""
    if kind == "byte_level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        trainer = trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<eos>"], initial_alphabet=alphabet, show_progress=False
        )
        tok.train_from_iterator(CORPUS, trainer)
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token="<s>", unk_token="<unk>")


def levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ca != cb))
    return row[-1]


def reference_dtw(cost: list[list[float]]) -> list[tuple[int, int]]:
    """The MinED reference's DTW (spec §9.1), cell by cell."""
    n, m = len(cost), len(cost[0])
    acc = [[math.inf] * (m + 1) for _ in range(n + 1)]
    acc[0][0] = 0.0
    for i in range(n):
        for j in range(m):
            acc[i + 1][j + 1] = cost[i][j] + min(acc[i][j + 1], acc[i + 1][j], acc[i][j])
    i, j, path = n - 1, m - 1, []
    while i > 0 or j > 0:
        path.append((i, j))
        options = [
            acc[i][j] if i > 0 and j > 0 else math.inf,  # diagonal (cells shifted by the border)
            acc[i][j + 1] if i > 0 else math.inf,  # up
            acc[i + 1][j] if j > 0 else math.inf,  # left
        ]
        move = options.index(min(options))
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
    return [(0, 0), *reversed(path)]


def reference_pairs(aligner: MinEditAligner, t_ids: list[int], s_ids: list[int]) -> list[tuple[int, int]]:
    """Spec §9.1 steps 2-3, plus the contract's one student position per teacher position."""
    t_str, s_str = aligner.teacher_strings, aligner.student_strings
    path = reference_dtw([[levenshtein(t_str[a], s_str[b]) for b in s_ids] for a in t_ids])
    teachers_of = defaultdict(list)
    for i, j in path:
        teachers_of[j].append(i)
    found, used = [], set()
    for j in range(len(s_ids)):
        if len(teachers_of[j]) == 1 and (i := teachers_of[j][0]) not in used and s_ids[j] == aligner.mapping[t_ids[i]]:
            found.append((i, j))
            used.add(i)
    return found


@settings(max_examples=200, deadline=None)
@given(data=st.data(), n=st.integers(1, 9), m=st.integers(1, 9))
def test_dtw_path_equals_the_reference_dtw_including_its_tie_breaking(data, n, m):
    cost = data.draw(st.lists(st.lists(st.integers(0, 2), min_size=m, max_size=m), min_size=n, max_size=n))
    rows, cols = dtw_path(np.array(cost, dtype=np.float64))
    assert list(zip(rows.tolist(), cols.tolist())) == reference_dtw(cost)


WORD = st.text("abcdeé▁Ġ", max_size=6)


@settings(max_examples=100, deadline=None)
@given(queries=st.lists(WORD, min_size=1, max_size=8), choices=st.lists(WORD, max_size=12))
def test_nearest_strings_is_the_brute_force_minimum_with_its_tie_breaks(queries, choices):
    found = nearest_strings(queries, choices)
    for query, index in zip(queries, found.tolist()):
        if not choices:
            assert index == -1
            continue
        key = [(levenshtein(query, c), abs(len(c) - len(query)), k) for k, c in enumerate(choices)]
        assert index == min(key)[2]


@pytest.mark.parametrize(("teacher", "student"), [("byte_level", "sentencepiece"), ("sentencepiece", "byte_level")])
def test_vocab_map_is_exact_bytes_first_then_the_nearest_respelled_token(teacher, student, tmp_path):
    t_tok, s_tok = tiny(teacher), tiny(student)
    mapping = mined_module.mined(t_tok, s_tok, cache_dir=str(tmp_path)).vocab_map().numpy()
    t_vb, s_vb = vocab_bytes(t_tok), vocab_bytes(s_tok)
    exact = exact_byte_map(t_vb, s_vb)
    t_pieces, s_pieces = (
        t_tok.convert_ids_to_tokens(list(range(t_vb.size))),
        s_tok.convert_ids_to_tokens(list(range(s_vb.size))),
    )
    candidates = [k for k in range(s_vb.size) if not s_vb.special[k]]
    assert mapping[t_tok.eos_token_id] == s_tok.eos_token_id
    for i in range(t_vb.size):
        if t_vb.special[i]:
            assert mapping[i] == (s_tok.eos_token_id if i == t_tok.eos_token_id else -1)
        elif exact[i] >= 0:
            assert mapping[i] == exact[i]
        else:
            query = t_pieces[i].replace(t_vb.marker, s_vb.marker)
            best = min((levenshtein(query, s_pieces[k]), abs(len(s_pieces[k]) - len(query)), k) for k in candidates)
            assert mapping[i] == best[2]


def test_vocab_map_is_cached_per_tokenizer_pair_and_reused(tmp_path, monkeypatch):
    first = mined_module.mined(tiny("byte_level"), tiny("sentencepiece"), cache_dir=str(tmp_path))
    assert len(list(tmp_path.glob("mined-vocab-map-*.npy"))) == 1

    def rebuild(*args, **kwargs):
        raise AssertionError("the cached map should have been loaded")

    monkeypatch.setattr(mined_module, "edit_distance_map", rebuild)
    again = mined_module.mined(tiny("byte_level"), tiny("sentencepiece"), cache_dir=str(tmp_path))
    assert torch.equal(first.vocab_map(), again.vocab_map())


def test_an_unwritable_cache_dir_only_costs_a_rebuild(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    aligner = mined_module.mined(tiny("byte_level"), tiny("sentencepiece"), cache_dir=str(blocker / "cache"))
    assert aligner.vocab_map().shape == (len(tiny("byte_level")),)


@lru_cache(maxsize=None)
def exact_mined(teacher: str, student: str) -> MinEditAligner:
    """The MinED aligner over real tokenizers with the exact-bytes map.

    The alignment step does not care how the map was built, and a real pair's edit-distance map
    takes seconds to build.
    """
    t, s = tokenizer(teacher), tokenizer(student)
    t_vb, s_vb = vocab_bytes(t), vocab_bytes(s)
    t_str = [p.replace(t_vb.marker, "") for p in t.convert_ids_to_tokens(list(range(t_vb.size)))]
    s_str = [p.replace(s_vb.marker, "") for p in s.convert_ids_to_tokens(list(range(s_vb.size)))]
    return MinEditAligner(t_str, s_str, exact_byte_map(t_vb, s_vb))


SENTENCES = [
    "Hello world.",
    "Distillation with 2 tokenizers\nworks, mostly!",
    "café au lait 😀",
    "polygons and  spaces",
]


@pytest.mark.parametrize(
    ("teacher", "student"), [("mistral", "tinyllama"), ("gpt2", "tinyllama"), ("tinyllama", "gpt2")]
)
@settings(max_examples=15, deadline=None)
@given(sentences=st.lists(st.sampled_from(SENTENCES), min_size=1, max_size=3))
def test_alignment_equals_the_reference_procedure(teacher, student, sentences):
    text = " ".join(sentences)
    t_ids = tokenizer(teacher)(text, add_special_tokens=False).input_ids + [tokenizer(teacher).eos_token_id]
    s_ids = tokenizer(student)(text, add_special_tokens=False).input_ids + [tokenizer(student).eos_token_id]
    found = exact_mined(teacher, student).align(t_ids, s_ids)
    assert found.is_monotonic()
    assert [tuple(p) for p in found.pairs.tolist()] == reference_pairs(exact_mined(teacher, student), t_ids, s_ids)


def test_same_tokenizer_aligns_every_position():
    ids = tokenizer("mistral")("Same text, same tokens.", add_special_tokens=False).input_ids + [2]
    assert exact_mined("mistral", "mistral").align(ids, ids).pairs.tolist() == [[k, k] for k in range(len(ids))]


def test_empty_sequences_align_nothing_and_the_aligner_pickles():
    aligner = exact_mined("gpt2", "tinyllama")
    assert len(aligner.align([], [5, 6])) == 0
    restored = pickle.loads(pickle.dumps(aligner))
    ids_t = tokenizer("gpt2")("Hello world", add_special_tokens=False).input_ids
    ids_s = tokenizer("tinyllama")("Hello world", add_special_tokens=False).input_ids
    # "Hello" maps to Llama's mid-word "Hello", not the text-initial "▁Hello": only " world" aligns.
    assert aligner.align(ids_t, ids_s).pairs.tolist() == [[1, 1]]
    assert np.array_equal(restored.align(ids_t, ids_s).pairs, aligner.align(ids_t, ids_s).pairs)


@pytest.mark.slow
def test_real_edit_distance_map_maps_every_ordinary_teacher_token(tmp_path):
    t, s = tokenizer("mistral"), tokenizer("tinyllama")
    mapping = mined_module.mined(t, s, cache_dir=str(tmp_path)).vocab_map().numpy()
    t_vb, s_vb = vocab_bytes(t), vocab_bytes(s)
    ordinary = ~t_vb.special
    assert (mapping[ordinary] >= 0).all() and not s_vb.special[mapping[ordinary]].any()
    exact = exact_byte_map(t_vb, s_vb)
    assert np.array_equal(mapping[exact >= 0], exact[exact >= 0])
    assert mapping[t.convert_tokens_to_ids("▁Hello")] == s.convert_tokens_to_ids("▁Hello")


def test_module_registers_mined():
    registered = {}
    mined_module.dskd_register_aligners(lambda name, obj: registered.setdefault(name, obj))
    assert registered == {"mined": mined_module.mined}
