"""Two measures of cross-tokenizer alignment that do not use the ETA aligner, for `dskd doctor` and the
alignment benchmark.

- `exact_span_pairs` / `exact_span_count`: the upper bound, measured on the *original* text. Each token's
  span is read from the fast tokenizer's character `offset_mapping` (an independent route to the spans
  ETA computes from byte tables), so a normaliser that rewrites the text (NFC, NFKC) cannot move it: a
  token pairs when it covers the same original text as a token of the other side. A text token's span
  leaves out the spaces at its edges; a token of spaces only is placed by where it starts in the text
  and how many spaces it and the tokens after it spell before the next text. Tokens that share one
  character (byte-fallback pieces, partial UTF-8 tokens) divide its bytes in order, and get no span when
  the tokenizer rewrote that character (their bytes then cannot be divided exactly). Plus the EOS pair.
- `greedy_pairs`: the public reference's greedy matching on raw token strings (spec §6.2), re-implemented
  as the baseline ETA is compared against.

Both tokenise with `split_special_tokens=True`, as training does (`dskd.data.examples`), so a literal `<unk>` in
the text is text.
"""

from __future__ import annotations

import json
import re
import weakref

from dskd.errors import ModelError


def _has_type(node, name: str) -> bool:
    """Whether a `tokenizers` JSON node, or any node inside it (a `Sequence`), has type `name`."""
    if isinstance(node, dict):
        return node.get("type") == name or any(_has_type(v, name) for v in node.values())
    if isinstance(node, list):
        return any(_has_type(v, name) for v in node)
    return False


_BYTE_LEVEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def is_byte_level(tok) -> bool:
    """Whether a tokenizer spells text as GPT-2's byte alphabet: read from its decoder, wherever the
    ByteLevel step sits (Qwen2 nests it in a `Sequence`), never from one pre-tokenizer layout. Remembered per
    tokenizer object: reading it serialises the whole tokenizer, a fifth of a second at a 50k vocabulary."""
    known = _BYTE_LEVEL.get(tok)
    if known is not None:
        return known
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(f"tokenizer {type(tok).__name__} has no fast backend; load it with use_fast=True")
    spec = json.loads(backend.to_str())
    found = _has_type(spec.get("decoder"), "ByteLevel") or _has_type(spec.get("pre_tokenizer"), "ByteLevel")
    _BYTE_LEVEL[tok] = found
    return found


def piece_bytes(byte_level: bool, piece: str) -> tuple[int, int]:
    """`(bytes, of which spaces)` a piece stands for, read from its spelling."""
    if byte_level:
        return len(piece), piece.count("Ġ")
    if m := re.fullmatch(r"<0x([0-9A-F]{2})>", piece):
        return 1, int(m.group(1) == "20")
    return len(piece.replace("▁", " ").encode()), piece.count("▁") + piece.count(" ")


def encode(tok, text: str):
    return tok(text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)


def offset_spans(tok, text: str) -> list[tuple | None]:
    """Each token's span on the original text (module doc): `("text", start, end)` in the text's UTF-8
    bytes without spaces, `("space", where, spaces to the next text from its start, from its end)`, or
    None (no exact span)."""
    enc = encode(tok, text)
    pieces, offsets = tok.convert_ids_to_tokens(enc.input_ids), enc.offset_mapping
    byte_level = is_byte_level(tok)
    sizes = [piece_bytes(byte_level, p) for p in pieces]
    before = [0]
    for ch in text:
        before.append(before[-1] + (0 if ch == " " else len(ch.encode())))
    spans: list[tuple | None] = []
    k = 0
    while k < len(pieces):
        stop, end = k + 1, offsets[k][1]
        while stop < len(pieces) and offsets[stop][0] < end:
            end, stop = max(end, offsets[stop][1]), stop + 1
        # A normaliser that merges characters ("e" + U+0301 -> "é") maps the token to the first one
        # only: the characters no token covers belong to the token before them.
        end = max(end, offsets[stop][0] if stop < len(pieces) else len(text))
        start, total = before[offsets[k][0]], before[end] - before[offsets[k][0]]
        counts = [n - spaces for n, spaces in sizes[k:stop]]
        if stop - k == 1:
            counts = [total]
        elif sum(counts) != total:  # the tokenizer rewrote this character: no exact division
            counts = [None] * (stop - k)
        for n in counts:
            spans.append(None if n is None else ("text", start, start + n))
            start += n or 0
        k = stop
    return _place_spaces(spans, sizes)


def _place_spaces(spans: list[tuple | None], sizes: list[tuple[int, int]]) -> list[tuple | None]:
    """Give each token of spaces only its place: where the text resumes, and how many spaces it and
    the tokens after it spell before that (the tokens of one run of spaces, in order)."""
    placed, after = list(spans), 0
    for k in range(len(spans) - 1, -1, -1):
        span, (n, spaces) = spans[k], sizes[k]
        if span is not None and span[2] > span[1]:
            after = spaces  # the spaces a text token spells come before its text
            placed[k] = span
            continue
        if n and spaces == n and span is not None:
            placed[k] = ("space", span[1], after + n, after)
            after += n
        else:
            placed[k] = None
    return placed


def exact_span_pairs(t_tok, s_tok, text: str) -> list[tuple[int, int]]:
    """The (teacher, student) token pairs whose spans on the original text coincide, without EOS."""
    t_spans = offset_spans(t_tok, text)
    s_at = {span: j for j, span in enumerate(offset_spans(s_tok, text)) if span is not None}
    return [(i, s_at[span]) for i, span in enumerate(t_spans) if span is not None and span in s_at]


def exact_span_count(t_tok, s_tok, text: str) -> int:
    return len(exact_span_pairs(t_tok, s_tok, text)) + 1  # + the EOS pair


def greedy_pairs(t_raw: list[str], s_raw: list[str], t_eos: str, s_eos: str) -> list[tuple[int, int]]:
    """The reference's greedy matching on raw token strings with `▁`/`Ġ` deleted (spec §6.2)."""
    t_norm = [p.replace("▁", "").replace("Ġ", "") for p in t_raw]
    s_norm = [p.replace("▁", "").replace("Ġ", "") for p in s_raw]
    i = j = 0
    t_hist = s_hist = ""
    found = []
    while i < len(t_norm) and j < len(s_norm):
        if t_hist == s_hist and (t_norm[i] == s_norm[j] or (t_raw[i] == t_eos and s_raw[j] == s_eos)):
            found.append((i, j))
            t_hist, s_hist, i, j = t_hist + t_norm[i], s_hist + s_norm[j], i + 1, j + 1
        elif len(t_hist) > len(s_hist):
            s_hist, j = s_hist + s_norm[j], j + 1
        elif len(t_hist) < len(s_hist):
            t_hist, i = t_hist + t_norm[i], i + 1
        else:
            t_hist, s_hist, i, j = t_hist + t_norm[i], s_hist + s_norm[j], i + 1, j + 1
    return found
