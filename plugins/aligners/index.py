"""`index`: pure index alignment, the pairing of Universal Logit Distillation (ULD, spec §9.2 step 1).

Response token `k` of the teacher is paired with response token `k` of the student, for
`k < min(len(teacher_ids), len(student_ids))`, whatever text the two tokens stand for. It knows nothing of
tokenization, which is exactly the baseline ULD defines (and why ETA exists). It works for any two tokenizers,
costs one `arange`, and holds no state but the two tokenizers, which it only needs for `vocab_map`.

The reference reached the same pairing by rotating labels and logits *in place* so the first response token
moved to index 0 (spec §14.19); here the pairs are index arithmetic on the label sequences, made in the data
loader, and nothing is mutated.
"""

from __future__ import annotations

import numpy as np
import torch

import dskd
from dskd.kit import Aligner, teacher_to_student_map, token_ids


class IndexAligner(Aligner):
    """Pairs `(k, k)` over the two label sequences, up to the shorter one's length."""

    def __init__(self, teacher_tokenizer, student_tokenizer) -> None:
        self.teacher_tokenizer = teacher_tokenizer
        self.student_tokenizer = student_tokenizer
        self.teacher_size, self.student_size = len(teacher_tokenizer), len(student_tokenizer)

    def align(self, teacher_ids, student_ids) -> dskd.Alignment:
        # Checked although only the lengths matter, so a -100 or a foreign id fails here with a sentence
        # instead of silently pairing positions of the wrong sequence.
        n_t = token_ids(teacher_ids, self.teacher_size, "teacher_ids").size
        n_s = token_ids(student_ids, self.student_size, "student_ids").size
        k = np.arange(min(n_t, n_s), dtype=np.int64)
        return dskd.Alignment(np.stack([k, k], axis=1))

    def vocab_map(self) -> torch.Tensor:
        """Teacher id -> student id with identical bytes, -1 where none (the exact map ETA uses).

        ULD itself needs no vocabulary map; this serves whatever reads the aligner's map (the evaluation's
        teacher agreement), so that configuring `aligner.name = "index"` never breaks it.
        """
        return teacher_to_student_map(self.teacher_tokenizer, self.student_tokenizer)


def index(teacher_tokenizer, student_tokenizer) -> IndexAligner:
    """Index alignment (ULD): pairs label token k of the teacher with label token k of the student."""
    return IndexAligner(teacher_tokenizer, student_tokenizer)


@dskd.hookimpl
def dskd_register_aligners(register) -> None:
    register("index", index)
