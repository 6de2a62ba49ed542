"""What the engine uses of an aligner: the contract, with the defaults of its optional members.

An aligner factory is called once, at setup, as `factory(teacher_tokenizer, student_tokenizer, **options)`.
The object it returns pairs the two tokenizations of one text. It runs in data-loader workers, so it must be
picklable and pure (same ids in, same pairs out).
"""

from __future__ import annotations

import torch

from dskd.types import Alignment


class Aligner:
    """Subclass it, or provide the same members: those with a default here are optional."""

    def align(self, teacher_ids, student_ids) -> Alignment:
        """Pairs of one sample: `teacher_ids` and `student_ids` are the two tokenizations (lists or 1-D int
        tensors) of the same text: the label ids of a dataset response (prompt excluded) or of an on-policy or
        teacher sample. Each row of `pairs` is `(teacher_position, student_position)` into those lists, both
        columns strictly increasing."""
        raise NotImplementedError

    def vocab_map(self) -> torch.Tensor | None:
        """A teacher-id -> student-id map `(V_t,)` int64, -1 where the teacher token has no student token with
        the same text; None when the aligner has none. Objectives that move a teacher distribution or a
        teacher's top-1 into the student's vocabulary across tokenizers (`dskd_v2`, `mined_kd`) and the
        evaluation's teacher agreement need it, and refuse at setup with a sentence when it is None."""
        return None

    def text_differs(self, teacher_ids, student_ids) -> bool:
        """Whether the two tokenizations decode to different text (a tokenizer's normaliser rewrote it, or one
        read a literal special-token string the other split). Counted per split as
        `data/normalisation_mismatches`; False (the default) when the aligner cannot tell."""
        return False

    @property
    def fingerprint(self) -> str:
        """What the cached alignments of a dataset depend on; empty: a hash of the aligner's class and fields."""
        return ""
