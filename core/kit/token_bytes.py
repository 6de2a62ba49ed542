"""The exact bytes of every token of a vocabulary, and the exact-bytes map between two vocabularies.

Cross-tokenizer alignment compares *what text a token stands for*, not how its tokenizer spells it:
GPT-2 writes a newline `Ċ` where Llama writes `<0x0A>`, and `ĠcafÃ©` where Mistral writes `▁café`.
Decoding every vocabulary entry once to its bytes makes both comparable:

- byte-level BPE (GPT-2, Qwen, Llama 3): each character of a piece stands for one byte through
  GPT-2's `bytes_to_unicode` table, so `Ġ` is a space and `Ċ` a newline;
- SentencePiece (Llama 2, TinyLlama, Mistral, Gemma): the space marker `▁` is a space, byte-fallback
  pieces `<0xNN>` are that byte, every other piece is its UTF-8;
- special tokens (BOS, EOS, unk, pad, chat markers) stand for no text: no bytes.

The family is read from the tokenizer's own definition (its pre-tokenizer, decoder and model in the
`tokenizers` JSON), never from its name, so renamed or fine-tuned tokenizers work unchanged.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from dskd.errors import DataError, ModelError

BYTE_LEVEL = "byte_level"
SENTENCEPIECE = "sentencepiece"
SPACE = 0x20
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's `bytes_to_unicode` table, inverted: the byte each byte-level character stands for.

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, 0x7F-0xA0, 0xAD) map
    to U+0100 onwards in byte order: that is why a space reads `Ġ` and a newline `Ċ`.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {chr(b): b for b in printable}
    shifted = sorted(set(range(256)) - set(printable))
    for n, b in enumerate(shifted):
        table[chr(256 + n)] = b
    return table


@dataclass(frozen=True)
class ByteTable:
    """The bytes of every id of a vocabulary in one buffer: `flat[offsets[i]:offsets[i+1]]` is id i.

    Two numpy arrays rather than a list of `bytes` objects, so that aligners holding one pickle
    cheaply into data-loader workers and gather the bytes of a whole sequence in a few vectorised
    operations.
    """

    flat: np.ndarray  # (total,) uint8
    offsets: np.ndarray  # (V + 1,) int64

    @classmethod
    def from_bytes(cls, pieces: list[bytes]) -> ByteTable:
        lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
        offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(np.frombuffer(b"".join(pieces), dtype=np.uint8).copy(), offsets)

    @property
    def size(self) -> int:
        return int(self.offsets.shape[0] - 1)

    def token(self, token_id: int) -> bytes:
        return self.flat[self.offsets[token_id] : self.offsets[token_id + 1]].tobytes()

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def without_spaces(self) -> ByteTable:
        """The same table with every space byte (0x20) removed from every entry."""
        keep = self.flat != SPACE
        kept_before = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
        return ByteTable(self.flat[keep], kept_before[self.offsets])

    def gather(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The bytes `(total,) uint8` of a sequence of ids end to end, and each id's length."""
        starts = self.offsets[ids]
        lengths = self.offsets[ids + 1] - starts
        ends = np.cumsum(lengths)
        # Index of output byte k = start of its token + (k - where that token begins in the output).
        index = np.arange(int(ends[-1]) if ends.size else 0) + np.repeat(starts - (ends - lengths), lengths)
        return self.flat[index], lengths


@dataclass(frozen=True)
class VocabBytes:
    """A tokenizer's vocabulary decoded to bytes, plus what aligners need to know of its specials.

    `byte_piece[i]` marks SentencePiece byte-fallback pieces (`<0x41>`): when another piece has the
    same bytes (`A`), maps prefer that one, because it is the one the tokenizer actually emits.
    """

    family: str
    marker: str  # the character the tokenizer writes for a space: "Ġ" or "▁"
    table: ByteTable
    special: np.ndarray  # (V,) bool
    byte_piece: np.ndarray  # (V,) bool
    eos_id: int | None

    @property
    def size(self) -> int:
        return self.table.size


def _backend_spec(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(
            f"tokenizer {type(tokenizer).__name__} has no fast (`tokenizers`) backend; load it "
            "with AutoTokenizer.from_pretrained(..., use_fast=True) so its token bytes can be read"
        )
    return json.loads(backend.to_str())


def _components(node) -> list[dict]:
    """A pre-tokenizer / decoder / normaliser JSON node and, for a `Sequence`, all inside it."""
    if not isinstance(node, dict):
        return []
    found = [node]
    for key in ("pretokenizers", "decoders", "normalizers"):
        for child in node.get(key) or []:
            found.extend(_components(child))
    return found


def detect_family(spec: dict) -> tuple[str, str]:
    """`(family, space marker)` of a tokenizer from its `tokenizers` JSON definition."""
    parts = _components(spec.get("pre_tokenizer")) + _components(spec.get("decoder"))
    parts += _components(spec.get("normalizer"))
    types = {p.get("type") for p in parts}
    if "ByteLevel" in types:
        return BYTE_LEVEL, "Ġ"
    for p in parts:
        if p.get("type") == "Metaspace":
            return SENTENCEPIECE, p.get("replacement", "▁")
        # Without Metaspace (Mistral, Gemma), the marker shows in a decoder that turns it into a
        # space, or in a normaliser that turns spaces into it.
        pattern = (p.get("pattern") or {}).get("String")
        if p.get("type") == "Replace" and p.get("content") == " " and pattern:
            return SENTENCEPIECE, pattern
        if p.get("type") == "Replace" and pattern == " " and p.get("content"):
            return SENTENCEPIECE, p["content"]
    raise ModelError(
        "cannot tell how this tokenizer writes text: it is neither byte-level BPE nor "
        "SentencePiece (no ByteLevel or Metaspace pre-tokenizer/decoder); use the `identity` "
        "aligner for same-vocabulary pairs"
    )


def _piece_bytes(piece: str, family: str, marker: str, byte_fallback: bool) -> bytes:
    if family == BYTE_LEVEL:
        table = byte_decoder()
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        return piece.encode("utf-8")  # a piece outside the byte alphabet can only be literal text
    if byte_fallback and (m := _BYTE_PIECE.fullmatch(piece)):
        return bytes([int(m.group(1), 16)])
    return piece.replace(marker, " ").encode("utf-8")


def vocab_bytes(tokenizer) -> VocabBytes:
    """Decode every id of a (fast) tokenizer's vocabulary to its exact bytes."""
    spec = _backend_spec(tokenizer)
    family, marker = detect_family(spec)
    model = spec.get("model") or {}
    byte_fallback = bool(model.get("byte_fallback")) or any(
        p.get("type") == "ByteFallback" for p in _components(spec.get("decoder"))
    )
    backend = tokenizer.backend_tokenizer
    vocab = backend.get_vocab(with_added_tokens=False)
    added = backend.get_added_tokens_decoder()
    size = max([len(tokenizer), *(i + 1 for i in vocab.values()), *(i + 1 for i in added)])
    pieces = [b""] * size
    special = np.zeros(size, dtype=bool)
    byte_piece = np.zeros(size, dtype=bool)
    for piece, i in vocab.items():
        pieces[i] = _piece_bytes(piece, family, marker, byte_fallback)
        byte_piece[i] = family == SENTENCEPIECE and byte_fallback and bool(_BYTE_PIECE.fullmatch(piece))
    for i, token in added.items():
        # Added tokens match raw text, so a non-special one stands for its content as written.
        pieces[i] = b"" if token.special else token.content.encode("utf-8")
        special[i] = token.special
    unk = vocab.get(model.get("unk_token") or "", model.get("unk_id"))
    for i in [*(getattr(tokenizer, "all_special_ids", None) or []), unk]:
        if isinstance(i, int) and 0 <= i < size:
            pieces[i], special[i] = b"", True
    eos = getattr(tokenizer, "eos_token_id", None)
    return VocabBytes(family, marker, ByteTable.from_bytes(pieces), special, byte_piece, eos)


def token_ids(ids, vocab_size: int, name: str) -> np.ndarray:
    """One tokenized sequence (list, numpy, torch) as a 1-D int64 array, or a `DataError`."""
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    array = np.asarray(ids, dtype=np.int64)
    if array.ndim != 1:
        raise DataError(
            f"{name} must be one sequence of token ids (1-D), got shape {tuple(array.shape)}; "
            "align one sample at a time"
        )
    if array.size and (array.min() < 0 or array.max() >= vocab_size):
        bad = int(array.min()) if array.min() < 0 else int(array.max())
        raise DataError(
            f"{name} holds id {bad}, outside the tokenizer's vocabulary [0, {vocab_size}); pass "
            "the label tokens without the -100 positions, tokenized by the aligner's tokenizer"
        )
    return array


def exact_byte_map(teacher: VocabBytes, student: VocabBytes) -> np.ndarray:
    """Teacher id -> the student id with identical bytes (spaces included), else -1; EOS -> EOS.

    Spaces are compared, not stripped: `Ġworld` maps to `▁world` and never to the mid-word `world`,
    because the map translates a *predicted next token*, and whether it starts a word is part of the
    prediction. Special tokens other than EOS map to -1, so an unknown string can never become
    `<unk>` or EOS.
    """
    by_bytes: dict[bytes, int] = {}
    for i in range(student.size):
        if student.special[i]:
            continue
        key = student.table.token(i)
        held = by_bytes.get(key)
        if key and (held is None or (student.byte_piece[held] and not student.byte_piece[i])):
            by_bytes[key] = i
    mapping = np.full(teacher.size, -1, dtype=np.int64)
    for i in range(teacher.size):
        if not teacher.special[i]:
            mapping[i] = by_bytes.get(teacher.table.token(i), -1)
    if teacher.eos_id is not None and student.eos_id is not None:
        mapping[teacher.eos_id] = student.eos_id
    return mapping


def teacher_to_student_map(teacher_tokenizer, student_tokenizer, *, num_teacher_ids: int | None = None) -> torch.Tensor:
    """The top-1 map `M` (spec §6.3, §15.3): `LongTensor (V_t,)` of student ids, -1 for none.

    Objectives apply it as one gather, `M[teacher_top1]`, and treat -1 as "the teacher's prediction
    has no student token". `num_teacher_ids` pads the map with -1 up to a model's (possibly padded)
    vocabulary size.
    """
    mapping = exact_byte_map(vocab_bytes(teacher_tokenizer), vocab_bytes(student_tokenizer))
    if num_teacher_ids is not None:
        if num_teacher_ids < mapping.shape[0]:
            raise ModelError(
                f"the teacher model has {num_teacher_ids} output ids but its tokenizer has "
                f"{mapping.shape[0]}; use the tokenizer that belongs to the teacher model"
            )
        mapping = np.concatenate([mapping, np.full(num_teacher_ids - mapping.shape[0], -1, dtype=np.int64)])
    return torch.from_numpy(mapping)
