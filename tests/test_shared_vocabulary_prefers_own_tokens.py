"""The shared vocabulary V' (DSKDv2's projector fit) pairs each student token with the teacher's own token,
not with a SentencePiece byte-fallback piece of the same bytes, on the real tokenizers."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from dskd.kit.dual_space import shared_vocabulary
from dskd.kit.token_bytes import teacher_to_student_map, vocab_bytes

TOKENIZERS = Path(__file__).resolve().parents[1] / "examples" / "tokenizers"


@lru_cache(maxsize=None)
def tokenizer(name: str):
    return AutoTokenizer.from_pretrained(TOKENIZERS / name)


@pytest.mark.slow
@pytest.mark.parametrize(("teacher", "student"), [("mistral", "tinyllama"), ("mistral", "gpt2"), ("tinyllama", "gpt2")])
def test_no_student_token_is_fitted_against_a_byte_piece_when_the_teacher_has_its_own(teacher, student):
    t_tok, s_tok = tokenizer(teacher), tokenizer(student)
    mapping = teacher_to_student_map(t_tok, s_tok)
    t_bytes, s_bytes = vocab_bytes(t_tok), vocab_bytes(s_tok)
    shared = shared_vocabulary(len(t_tok), len(s_tok), mapping, own=torch.from_numpy(~t_bytes.byte_piece))
    # Independently: the student ids some ordinary (non-byte-piece) teacher token maps to.
    own = {int(mapping[i]) for i in range(len(t_tok)) if mapping[i] >= 0 and not t_bytes.byte_piece[i]}
    chosen = dict(zip(shared.student_ids.tolist(), shared.teacher_ids.tolist()))
    assert own <= set(chosen)
    assert [s for s in own if t_bytes.byte_piece[chosen[s]]] == []
    # Every chosen pair still has identical bytes, one teacher id per student id.
    assert all(t_bytes.table.token(t) == s_bytes.table.token(s) for s, t in chosen.items() if t != t_tok.eos_token_id)
    assert len(set(chosen.values())) == len(chosen)
    # "A" is fitted against the teacher's own "A".
    a = s_tok.convert_tokens_to_ids("A")
    assert t_tok.convert_ids_to_tokens(chosen[a]) == "A"


@pytest.mark.slow
def test_dskd_v2_fits_its_projector_on_the_teachers_own_tokens():
    from cross_vocab_models import make_context, models
    from cross_vocab_models import tokenizer as model_tokenizer

    from dskd.plugins.aligners.eta import eta
    from dskd.plugins.divergences.forward_kl import forward_kl
    from dskd.plugins.objectives.dskd_v2 import dskd_v2

    student, teacher = models("gpt2", "tinyllama")
    t_tok, s_tok = model_tokenizer("tinyllama"), model_tokenizer("gpt2")
    aligner = eta(t_tok, s_tok)
    objective = dskd_v2(make_context(student, teacher, divergence=forward_kl, aligner=aligner))
    chosen = dict(zip(objective.shared.student_ids.tolist(), objective.shared.teacher_ids.tolist()))
    for text in ("A", "7", ".", "the"):
        assert t_tok.convert_ids_to_tokens(chosen[s_tok.convert_tokens_to_ids(text)]) == text
    # A byte piece is chosen only where the teacher has no token of its own with those bytes.
    byte_piece, mapping = vocab_bytes(t_tok).byte_piece, aligner.vocab_map()
    has_own = {int(mapping[t]) for t in range(len(t_tok)) if mapping[t] >= 0 and not byte_piece[t]}
    assert [s for s, t in chosen.items() if byte_piece[t] and s in has_own] == []
