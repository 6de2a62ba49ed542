"""Two measures of cross-tokenizer alignment that do not use the ETA aligner, for `dskd doctor` and the
alignment benchmark.

- `exact_span_count`: the upper bound. Token pairs whose space-stripped byte spans coincide, counted from the
  fast tokenizers' character `offset_mapping` (an independent route to the spans ETA computes from byte
  tables), plus the EOS pair.
- `greedy_pairs`: the public reference's greedy matching on raw token strings (spec §6.2), re-implemented
  as the baseline ETA is compared against.
"""

from __future__ import annotations

import re


def stripped_byte_count(byte_level: bool, piece: str) -> int:
    if byte_level:
        return len(piece) - piece.count("Ġ")
    if m := re.fullmatch(r"<0x([0-9A-F]{2})>", piece):
        return 0 if m.group(1) == "20" else 1
    return len(piece.replace("▁", "").encode())


def offset_spans(tok, text: str) -> list[tuple[int, int]]:
    """Space-stripped byte span of each token, from character offsets.

    A run of tokens sharing one character (byte pieces) splits its bytes in order.
    """
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    pieces, offsets = tok.convert_ids_to_tokens(enc.input_ids), enc.offset_mapping
    byte_level = type(tok.backend_tokenizer.pre_tokenizer).__name__ == "ByteLevel"
    before = [0]
    for ch in text:
        before.append(before[-1] + (0 if ch == " " else len(ch.encode())))
    spans, k = [], 0
    while k < len(pieces):
        stop, end = k + 1, offsets[k][1]
        while stop < len(pieces) and offsets[stop][0] < end:
            end, stop = max(end, offsets[stop][1]), stop + 1
        start, total = before[offsets[k][0]], before[end] - before[offsets[k][0]]
        counts = (
            [stripped_byte_count(byte_level, p) for p in pieces[k:stop]]
            if stop - k > 1
            else [total]
        )
        assert sum(counts) == total, f"offsets and pieces disagree on {pieces[k:stop]!r}"
        for n in counts:
            spans.append((start, start + n))
            start += n
        k = stop
    return spans


def exact_span_count(t_tok, s_tok, text: str) -> int:
    t_spans = [s for s in offset_spans(t_tok, text) if s[1] > s[0]]
    s_spans = {s for s in offset_spans(s_tok, text) if s[1] > s[0]}
    return sum(span in s_spans for span in t_spans) + 1  # + the EOS pair


def greedy_pairs(
    t_raw: list[str], s_raw: list[str], t_eos: str, s_eos: str
) -> list[tuple[int, int]]:
    """The reference's greedy matching on raw token strings with `▁`/`Ġ` deleted (spec §6.2)."""
    t_norm = [p.replace("▁", "").replace("Ġ", "") for p in t_raw]
    s_norm = [p.replace("▁", "").replace("Ġ", "") for p in s_raw]
    i = j = 0
    t_hist = s_hist = ""
    found = []
    while i < len(t_norm) and j < len(s_norm):
        if t_hist == s_hist and (
            t_norm[i] == s_norm[j] or (t_raw[i] == t_eos and s_raw[j] == s_eos)
        ):
            found.append((i, j))
            t_hist, s_hist, i, j = t_hist + t_norm[i], s_hist + s_norm[j], i + 1, j + 1
        elif len(t_hist) > len(s_hist):
            s_hist, j = s_hist + s_norm[j], j + 1
        elif len(t_hist) < len(s_hist):
            t_hist, i = t_hist + t_norm[i], i + 1
        else:
            t_hist, s_hist, i, j = t_hist + t_norm[i], s_hist + s_norm[j], i + 1, j + 1
    return found
