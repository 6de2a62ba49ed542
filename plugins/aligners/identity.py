"""`identity`: teacher and student share one vocabulary, so their position `i` is the same token.

This is the aligner of same-tokenizer distillation (e.g. Llama-2-7B -> TinyLlama). It refuses
tokenizers whose vocabularies differ, because pairing positions of two different tokenizations pairs
unrelated text.
"""

from __future__ import annotations

import numpy as np

import dskd
from dskd import PluginError
from dskd.kit import Aligner, token_ids


class IdentityAligner(Aligner):
    """Pairs `(i, i)` for every position both sequences have."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def align(self, teacher_ids, student_ids) -> dskd.Alignment:
        n = min(
            token_ids(teacher_ids, self.vocab_size, "teacher_ids").size,
            token_ids(student_ids, self.vocab_size, "student_ids").size,
        )
        positions = np.arange(n, dtype=np.int64)
        return dskd.Alignment(np.stack([positions, positions], axis=1))


def identity(teacher_tokenizer, student_tokenizer) -> IdentityAligner:
    """Same-vocabulary alignment; a `PluginError` when the two vocabularies differ."""
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        differing = sum(student_vocab.get(piece) != i for piece, i in teacher_vocab.items())
        raise PluginError(
            f"aligner 'identity' needs one vocabulary, but the teacher's ({len(teacher_vocab)} "
            f"tokens) and the student's ({len(student_vocab)} tokens) differ in {differing} "
            'entries; set [aligner] name = "eta" (or "mined") for different tokenizers'
        )
    return IdentityAligner(max([len(teacher_tokenizer), *(i + 1 for i in teacher_vocab.values())]))


@dskd.hookimpl
def dskd_register_aligners(register) -> None:
    register("identity", identity)
