"""ETA and `dskd doctor` where two tokenizers disagree about the text: a normaliser (NFC) rewrote it, or one
tokenizer read a literal special-token string as its special token.

The Qwen2-style tokenizer (GPT-2's vocabulary behind an NFC normaliser and a `Sequence` pre-tokenizer) is
built offline by `benchmarks/bench_align.py`; the oracle is `dskd.evaluation.alignment_bounds`, which reads spans on
the original text through the tokenizers' offsets, not through ETA's byte tables.
"""

from __future__ import annotations

import importlib.util
import unicodedata
from functools import lru_cache
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dskd.evaluation.alignment_bounds import exact_span_pairs, is_byte_level, offset_spans
from dskd.evaluation.doctor import diagnose
from dskd.plugins.aligners.eta import eta

ROOT = Path(__file__).resolve().parents[1]
TOKENIZERS = ROOT / "examples" / "tokenizers"
FRENCH = (
    "Le café de la rue était fermé, mais l'élève a trouvé une crème brûlée à côté de la gare. "
    "Où est passée la clé ? Il a répété trois fois : déjà vu, déjà fait, déjà oublié."
)
NFD = unicodedata.normalize("NFD", FRENCH)


@lru_cache(maxsize=None)
def tokenizer(name: str):
    return AutoTokenizer.from_pretrained(TOKENIZERS / name)


@pytest.fixture(scope="module")
def nfc_folder(tmp_path_factory) -> Path:
    spec = importlib.util.spec_from_file_location("bench_align", ROOT / "benchmarks" / "bench_align.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    folder = tmp_path_factory.mktemp("qwen2-style")
    bench.nfc_byte_level_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def nfc(nfc_folder):
    return AutoTokenizer.from_pretrained(nfc_folder)


def label_ids(tok, text: str, split_special_tokens: bool = True) -> list[int]:
    ids = tok(text, add_special_tokens=False, split_special_tokens=split_special_tokens).input_ids
    return ids + [tok.eos_token_id]


def eta_pairs(t_tok, s_tok, text: str) -> list[tuple[int, int]]:
    found = eta(t_tok, s_tok).align(label_ids(t_tok, text), label_ids(s_tok, text))
    return [tuple(p) for p in found.pairs.tolist()]


def test_the_built_tokenizer_is_qwen2_style(nfc):
    spec = nfc.backend_tokenizer
    assert type(spec.pre_tokenizer).__name__ == "Sequence" and type(spec.normalizer).__name__ == "NFC"
    assert is_byte_level(nfc) and not is_byte_level(tokenizer("mistral"))
    # The normaliser really rewrites NFD text: the two sides decode to different bytes.
    assert nfc.decode(nfc(NFD).input_ids) == FRENCH != NFD


@pytest.mark.slow
@pytest.mark.parametrize("other", ["gpt2", "tinyllama", "mistral"])
@pytest.mark.parametrize("nfc_is_teacher", [True, False])
def test_nfd_text_against_an_nfc_tokenizer_pairs_every_exact_span_on_the_original_text(nfc, other, nfc_is_teacher):
    t_tok, s_tok = (nfc, tokenizer(other)) if nfc_is_teacher else (tokenizer(other), nfc)
    found = eta_pairs(t_tok, s_tok, NFD)
    bound = exact_span_pairs(t_tok, s_tok, NFD)
    assert set(bound) <= set(found)  # recall 1.0 of the bound on the original text
    # The old aligner stopped at the first accent ("café", the second word); the final "." and EOS pair.
    n_t, n_s = len(label_ids(t_tok, NFD)), len(label_ids(s_tok, NFD))
    assert found[-2:] == [(n_t - 2, n_s - 2), (n_t - 1, n_s - 1)]


def _touching(tok, text: str) -> int:
    """Tokens whose original text holds a character NFC rewrites (a base letter and its combining mark)."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)
    rewritten = {k for k, ch in enumerate(text) if unicodedata.combining(ch)}
    rewritten |= {k - 1 for k in rewritten}
    return sum(any(c in rewritten for c in range(a, max(b, a + 1))) for a, b in enc.offset_mapping)


@pytest.mark.slow
@pytest.mark.parametrize("other", ["gpt2", "tinyllama", "mistral"])
def test_a_normalisation_difference_costs_at_most_the_tokens_it_touches(nfc, other):
    agreed = len(eta_pairs(nfc, tokenizer(other), FRENCH))  # both read the same NFC text
    rewritten = len(eta_pairs(nfc, tokenizer(other), NFD))
    touched = _touching(tokenizer(other), NFD)
    assert 0 < agreed - rewritten <= touched


def test_a_literal_unk_read_as_a_special_token_costs_only_its_own_tokens():
    # Without split_special_tokens Mistral reads "<unk>" as its unk token (no text); GPT-2 spells it out.
    text = "Replace every <unk> marker with the word you meant, then run the checks again."
    mistral, gpt2 = tokenizer("mistral"), tokenizer("gpt2")
    t_ids, s_ids = label_ids(mistral, text, split_special_tokens=False), label_ids(gpt2, text)
    assert mistral.unk_token_id in t_ids
    found = eta(mistral, gpt2).align(t_ids, s_ids).pairs.tolist()
    after = t_ids.index(mistral.unk_token_id)
    words_after = len(t_ids) - after - 1
    assert sum(i > after for i, _ in found) >= words_after - 1  # all but the word touching the marker
    assert found[-1] == [len(t_ids) - 1, len(s_ids) - 1]  # and the EOS pair


def test_text_differs_flags_only_samples_whose_tokenizations_disagree(nfc):
    aligner = eta(nfc, tokenizer("mistral"))
    mistral = tokenizer("mistral")
    assert aligner.text_differs(label_ids(nfc, NFD), label_ids(mistral, NFD))
    assert not aligner.text_differs(label_ids(nfc, FRENCH), label_ids(mistral, FRENCH))


def test_offset_spans_give_no_span_to_pieces_of_a_rewritten_character(nfc):
    # NFC turns "e" + U+0301 into "é", which this vocabulary splits into two byte tokens: their bytes
    # cannot be divided over the original three, so neither has an exact span (the old bound asserted).
    text = "x\u0107\u0301y"  # "ć" + combining acute: NFC keeps them apart only partly
    spans = offset_spans(nfc, text)
    assert len(spans) == len(nfc(text, add_special_tokens=False).input_ids)


@pytest.mark.slow
def test_doctor_runs_on_a_qwen2_style_tokenizer_and_reaches_the_bound(nfc_folder):
    # Its built-in sample (with "Café", "😀", "東京") crashed the old bound with "offsets and pieces disagree".
    for teacher, student in ((str(nfc_folder), str(TOKENIZERS / "mistral")),):
        a = diagnose(teacher, student)["alignment"]
        assert a["eta_recall"] == 1.0 and a["eta_pairs"] == a["exact_span_pairs"] > 0
        assert a["reference_greedy_exact_pairs"] <= a["reference_greedy_pairs"]
        assert a["reference_greedy_exact_pairs"] <= a["eta_pairs"]
