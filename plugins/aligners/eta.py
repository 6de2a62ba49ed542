"""`eta`: Exact Token Alignment on decoded byte spans (spec §6.6).

Both tokenizations are decoded to bytes (`dskd.kit.token_bytes`) and the space bytes removed, as the
reference removes its `Ġ`/`▁` markers. Each token then covers a byte span `[s, e)` of the same byte
string, and a teacher token and a student token are paired exactly when their non-empty spans are
equal: they saw the same text before them and stand for the same text. The two EOS tokens that end
both sequences are paired when all the text before them matched.

Unlike the reference's greedy string matching (spec §6.2), this never desynchronises: `Ċ` against
`<0x0A>`, byte-fallback pieces against whole characters, and byte-level mojibake against UTF-8 all
compare as the same bytes. Where the reference is well defined (a shared alphabet, ASCII text, no
pure-space tokens) both return the same pairs. It costs a few vectorised numpy operations per
sequence, with no loop over tokens.
"""

from __future__ import annotations

import numpy as np
import torch

import dskd
from dskd.kit import SPACE, ByteTable, VocabBytes, exact_byte_map, token_ids, vocab_bytes


def _spans(
    table: ByteTable, ids: np.ndarray, drop_leading_spaces: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The bytes of a sequence and each token's `[start, end)` in them."""
    stream, lengths = table.gather(ids)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    if drop_leading_spaces and stream.size:
        # SentencePiece adds a space before the first word (and TinyLlama drops a real one), so the
        # text's leading spaces are the one place where two tokenizers of the same text disagree
        # about spaces.
        text = stream != SPACE
        lead = int(np.argmax(text)) if text.any() else int(stream.size)
        stream = stream[lead:]
        starts, ends = np.maximum(starts - lead, 0), np.maximum(ends - lead, 0)
    return stream, starts, ends


class ExactTokenAligner:
    """Pairs the tokens of two tokenizations of one text whose byte spans coincide (module doc).

    It holds numpy byte tables and the EOS ids only, so it pickles into data-loader workers in about
    2 ms (2.4 MB for GPT-2 with TinyLlama).
    """

    def __init__(
        self, teacher: VocabBytes, student: VocabBytes, *, keep_spaces: bool = False
    ) -> None:
        self.teacher, self.student, self.keep_spaces = teacher, student, keep_spaces
        self._t_table = teacher.table if keep_spaces else teacher.table.without_spaces()
        self._s_table = student.table if keep_spaces else student.table.without_spaces()

    def align(self, teacher_ids, student_ids) -> dskd.Alignment:
        t_ids = token_ids(teacher_ids, self.teacher.size, "teacher_ids")
        s_ids = token_ids(student_ids, self.student.size, "student_ids")
        t_bytes, t_starts, t_ends = _spans(self._t_table, t_ids, self.keep_spaces)
        s_bytes, s_starts, s_ends = _spans(self._s_table, s_ids, self.keep_spaces)
        # Spans are only comparable while both decode to the same bytes (one may be truncated, or
        # hold text a tokenizer rewrote, e.g. a literal `▁` read as a space): stop at the first byte
        # where they differ.
        n = min(t_bytes.size, s_bytes.size)
        differ = np.flatnonzero(t_bytes[:n] != s_bytes[:n])
        common = int(differ[0]) if differ.size else n
        t_keep = np.flatnonzero((t_ends > t_starts) & (t_ends <= common))
        s_keep = np.flatnonzero((s_ends > s_starts) & (s_ends <= common))
        # Non-empty spans of one sequence are disjoint, so their ends strictly increase: a
        # two-pointer merge on the ends is one searchsorted, and equal ends then need equal starts.
        s_end_sorted = s_ends[s_keep]
        at = np.minimum(np.searchsorted(s_end_sorted, t_ends[t_keep]), max(s_keep.size - 1, 0))
        same = np.zeros(t_keep.size, dtype=bool)
        if s_keep.size:
            same = (s_end_sorted[at] == t_ends[t_keep]) & (s_starts[s_keep][at] == t_starts[t_keep])
        pairs = np.stack([t_keep[same], s_keep[at[same]]], axis=1)
        if self._ends_with_both_eos(t_ids, s_ids) and t_bytes.size == s_bytes.size == common:
            pairs = np.concatenate([pairs, [[t_ids.size - 1, s_ids.size - 1]]])
        return dskd.Alignment(pairs)

    def _ends_with_both_eos(self, t_ids: np.ndarray, s_ids: np.ndarray) -> bool:
        t_eos, s_eos = self.teacher.eos_id, self.student.eos_id
        return bool(
            t_ids.size
            and s_ids.size
            and t_eos is not None
            and s_eos is not None
            and t_ids[-1] == t_eos
            and s_ids[-1] == s_eos
        )

    def vocab_map(self) -> torch.Tensor:
        """The top-1 map: teacher id -> student id with identical bytes, -1 if none (spec §6.3)."""
        return torch.from_numpy(exact_byte_map(self.teacher, self.student))


def eta(teacher_tokenizer, student_tokenizer, *, keep_spaces: bool = False) -> ExactTokenAligner:
    """Exact Token Alignment.

    `keep_spaces=True` compares spans with their spaces: a token and its space-prefixed twin no
    longer pair, and pure-space tokens become alignable. The default removes spaces, as the
    reference does.
    """
    return ExactTokenAligner(
        vocab_bytes(teacher_tokenizer), vocab_bytes(student_tokenizer), keep_spaces=keep_spaces
    )


eta.default = True  # the aligner across vocabularies when a job names none


@dskd.hookimpl
def dskd_register_aligners(register) -> None:
    register("eta", eta)
