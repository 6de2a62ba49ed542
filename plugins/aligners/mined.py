"""`mined`: minimum-edit-distance alignment, the FuseLLM-style baseline of DSKD (spec §9.1).

Two parts:

- a vocabulary map teacher id -> student id: the student token with exactly the same bytes when
  there is one (so `Ġworld` -> `▁world`, `Ċ` -> `<0x0A>`), otherwise the student token nearest in
  edit distance to the teacher's spelling with its space marker rewritten to the student's. Teacher
  EOS maps to student EOS, other special tokens to -1. It is built once per tokenizer pair and
  cached on disk: the nearest-string search takes 2-10 s for the real tokenizers on 2 cores;
- per sequence, dynamic time warping on the edit distance between the token strings with their space
  markers removed. A student position is aligned when the warping path maps it to exactly one
  teacher position whose token the vocabulary map sends to that student token.

Deviations from the reference, both forced by the aligner contract: sequences are the *label* tokens
(the reference compares input tokens), and when the path maps one teacher position to several
aligned student positions only the first is kept, so both columns of the pairs strictly increase.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

import dskd
from dskd.kit import Aligner, VocabBytes, exact_byte_map, token_ids, tokenizer_fingerprint, vocab_bytes
from dskd.plugins.aligners._edit_distance import distance_matrix, dtw_path, nearest_strings

MAP_VERSION = "1"  # bump when the map's definition changes, so stale caches are not reused


def edit_distance_map(
    teacher: VocabBytes, student: VocabBytes, teacher_pieces: list[str], student_pieces: list[str]
) -> np.ndarray:
    """Teacher id -> student id: exact bytes first, else the nearest spelling (module doc)."""
    mapping = exact_byte_map(teacher, student)
    todo = np.flatnonzero((mapping < 0) & ~teacher.special & (teacher.table.lengths() > 0))
    candidates = np.flatnonzero(~student.special)
    queries = [teacher_pieces[i].replace(teacher.marker, student.marker) for i in todo]
    nearest = nearest_strings(queries, [student_pieces[i] for i in candidates])
    mapping[todo] = np.where(nearest >= 0, candidates[np.maximum(nearest, 0)], -1)
    return mapping


def cached_map(teacher_tokenizer, student_tokenizer, cache_dir: str, build) -> np.ndarray:
    """`build()`, kept in `cache_dir` under both tokenizers' fingerprints and reused from there."""
    pair = f"{tokenizer_fingerprint(teacher_tokenizer)}-{tokenizer_fingerprint(student_tokenizer)}"
    key = f"mined-vocab-map-v{MAP_VERSION}-{pair}.npy"
    path = Path(cache_dir).expanduser() / key
    if path.is_file():
        return np.load(path)
    mapping = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write, then rename: concurrent runs never read a half-written file.
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            np.save(f, mapping)
        os.replace(f.name, path)
    except OSError:
        pass  # a read-only cache only costs the rebuild next time; it must not stop the run
    return mapping


class MinEditAligner(Aligner):
    """DTW on edit distances between token strings, filtered by the vocabulary map (module doc)."""

    def __init__(self, teacher_strings: list[str], student_strings: list[str], mapping: np.ndarray) -> None:
        self.teacher_strings = teacher_strings  # raw pieces without the space marker, by id
        self.student_strings = student_strings
        self.mapping = mapping

    def align(self, teacher_ids, student_ids) -> dskd.Alignment:
        t_ids = token_ids(teacher_ids, len(self.teacher_strings), "teacher_ids")
        s_ids = token_ids(student_ids, len(self.student_strings), "student_ids")
        if t_ids.size == 0 or s_ids.size == 0:
            return dskd.Alignment(np.zeros((0, 2), dtype=np.int64))
        # Distances depend only on the two ids: compute them once per distinct pair.
        t_unique, t_at = np.unique(t_ids, return_inverse=True)
        s_unique, s_at = np.unique(s_ids, return_inverse=True)
        distinct = distance_matrix(
            [self.teacher_strings[i] for i in t_unique], [self.student_strings[i] for i in s_unique]
        )
        rows, cols = dtw_path(distinct[t_at][:, s_at])
        # A student position is one-to-one when exactly one path cell lies in its column.
        one_to_one = np.bincount(cols, minlength=s_ids.size)[cols] == 1
        t_pos, s_pos = rows[one_to_one], cols[one_to_one]
        keep = s_ids[s_pos] == self.mapping[t_ids[t_pos]]
        t_pos, s_pos = t_pos[keep], s_pos[keep]
        # The path is monotone, so repeats of a teacher position are adjacent: keep the first.
        first = np.ones(t_pos.size, dtype=bool)
        first[1:] = t_pos[1:] != t_pos[:-1]
        return dskd.Alignment(np.stack([t_pos[first], s_pos[first]], axis=1))

    def vocab_map(self) -> torch.Tensor:
        """Teacher id -> student id (`LongTensor (V_t,)`; -1 for specials without a counterpart)."""
        return torch.from_numpy(self.mapping.copy())


def _pieces(tokenizer, size: int) -> list[str]:
    return [p or "" for p in tokenizer.convert_ids_to_tokens(list(range(size)))]


def mined(teacher_tokenizer, student_tokenizer, *, cache_dir: str = "~/.cache/dskd") -> MinEditAligner:
    """MinED alignment; the vocabulary map is cached in `cache_dir` per tokenizer pair."""
    teacher, student = vocab_bytes(teacher_tokenizer), vocab_bytes(student_tokenizer)
    t_pieces = _pieces(teacher_tokenizer, teacher.size)
    s_pieces = _pieces(student_tokenizer, student.size)
    mapping = cached_map(
        teacher_tokenizer,
        student_tokenizer,
        cache_dir,
        lambda: edit_distance_map(teacher, student, t_pieces, s_pieces),
    )
    return MinEditAligner(
        [p.replace(teacher.marker, "") for p in t_pieces],
        [p.replace(student.marker, "") for p in s_pieces],
        mapping,
    )


@dskd.hookimpl
def dskd_register_aligners(register) -> None:
    register("mined", mined)
