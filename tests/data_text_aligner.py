"""A test stand-in for a real aligner (ETA is another module's job): picklable, so it runs in data workers."""

from __future__ import annotations

import numpy as np

from dskd.types import Alignment


class EqualTextAligner:
    """Pairs label tokens whose decoded text and start offset agree, increasing in both columns.

    Decoding growing prefixes is quadratic, which is fine for the short responses of the tests.
    """

    def __init__(self, teacher_tokenizer, student_tokenizer):
        self.teacher_tokenizer = teacher_tokenizer
        self.student_tokenizer = student_tokenizer

    @staticmethod
    def spans(tokenizer, ids):
        """(start offset, text) of each token in the decoded text; special tokens decode to ""."""
        spans, previous = [], ""
        for k in range(len(ids)):
            text = tokenizer.decode(list(ids[: k + 1]), skip_special_tokens=True)
            spans.append((len(previous), text[len(previous) :]))
            previous = text
        return spans

    def align(self, teacher_ids, student_ids):
        student = {span: j for j, span in reversed(list(enumerate(self.spans(self.student_tokenizer, student_ids))))}
        pairs, last = [], -1
        for i, span in enumerate(self.spans(self.teacher_tokenizer, teacher_ids)):
            j = student.get(span, -1)
            if j > last:
                pairs.append((i, j))
                last = j
        return Alignment(np.array(pairs, dtype=np.int64).reshape(-1, 2))
