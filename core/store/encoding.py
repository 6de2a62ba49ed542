"""A teacher signal <-> the tensors of a shard, and the key a sequence is found by.

Per label row, `hidden` keeps the last hidden state (`bfloat16`: 2·d bytes, bit-exact for a bf16 teacher;
`float32`: exact for any teacher; `int8`: d bytes plus a float32 scale per row, `h ≈ q · scale` with
`scale = max|h| / 127`). `topk` keeps the top-k ids (uint16 when the vocabulary fits, else int32), their
log-probabilities (float16 by default: 2^-11 relative error, below what bf16 would add) and the float32 log of
the mass outside them (often far below float16's range). k = 64 at a 32k vocabulary is 2·64 + 2·64 + 4 = 260
bytes a row; at a 150k vocabulary 388.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
INT8_MAX = 127.0


def sequence_key(input_ids) -> str:
    """The key of one sequence: a hash of its unpadded teacher *input* ids (the ids a teacher is scored on, i.e.
    every token but the last), so any batch order, padding or policy of a training run finds it."""
    array = np.ascontiguousarray(np.asarray(input_ids, dtype="<i8"))
    return hashlib.sha256(array.tobytes()).hexdigest()[:32]


def id_dtype(vocab_size: int) -> torch.dtype:
    return torch.uint16 if vocab_size <= 1 << 16 else torch.int32


def encode_rows(mode: str, dtype: str, signal, vocab_size: int) -> dict[str, torch.Tensor]:
    """The stored form of a signal's rows (on the CPU)."""
    if mode == "hidden":
        hidden = signal.hidden_states.detach().cpu()
        if dtype == "int8":
            h = hidden.float()
            scale = h.abs().amax(dim=1) / INT8_MAX
            q = torch.round(h / scale.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)).clamp(
                -INT8_MAX, INT8_MAX
            )
            return {"hidden_q": q.to(torch.int8), "hidden_scale": scale}
        return {"hidden": hidden.to(DTYPES[dtype])}
    return {
        "topk_ids": signal.topk_ids.detach().cpu().to(torch.int64).to(id_dtype(vocab_size)),
        "topk_logprobs": signal.topk_logprobs.detach().cpu().float().to(DTYPES[dtype]),
        "tail_logmass": signal.tail_logmass.detach().cpu().float(),
    }


ROW_TENSORS = {
    ("hidden", "int8"): ("hidden_q", "hidden_scale"),
    ("hidden", "bfloat16"): ("hidden",),
    ("hidden", "float32"): ("hidden",),
    ("topk", "float16"): ("topk_ids", "topk_logprobs", "tail_logmass"),
    ("topk", "bfloat16"): ("topk_ids", "topk_logprobs", "tail_logmass"),
}


def row_bytes(mode: str, dtype: str, hidden_size: int, k: int, vocab_size: int) -> int:
    """Bytes one label row's signal takes in a shard."""
    if mode == "hidden":
        return hidden_size + 4 if dtype == "int8" else hidden_size * DTYPES[dtype].itemsize
    return k * (id_dtype(vocab_size).itemsize + DTYPES[dtype].itemsize) + 4


def decode_hidden(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Hidden states as stored (bf16 / float32), or dequantised int8 in float32."""
    if "hidden" in tensors:
        return tensors["hidden"]
    return tensors["hidden_q"].float() * tensors["hidden_scale"].unsqueeze(1)


def narrow_topk(
    ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top `k` of stored top-K entries (sorted, K >= k) with the tail widened by the dropped entries, exactly:
    `tail_k = log(exp(tail_K) + sum of the dropped probabilities)`."""
    logprobs = logprobs.float()
    if k == logprobs.shape[1]:
        return ids.to(torch.int64), logprobs, tail.float()
    widened = torch.logsumexp(torch.cat([tail.float().unsqueeze(1), logprobs[:, k:]], dim=1), dim=1)
    return ids[:, :k].to(torch.int64), logprobs[:, :k], widened
