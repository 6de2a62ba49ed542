"""Turning a padded `(B, T)` batch and its flat rows into Score requests, and the answers back into a signal.

The engine hands a teacher padded ids and the flat positions `b * T + t` it wants; the wire wants packed
sequences and, per sequence, positions within it. Packing is vectorised (one boolean gather for the ids, one
integer division for the rows), with a Python loop only over sequences when a batch must be split. Rows may come in any order: they are sorted by sequence for the wire and
the answer is put back in the caller's order. A batch larger than the server's per-request limits is cut
into several requests of whole sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch

from dskd.errors import TeacherError
from dskd.protos import teacher_pb2 as pb
from dskd.servers.wire import WIRE_DTYPES, int32_bytes
from dskd.types import SignalRequest, TeacherSignal


@dataclass(frozen=True)
class RequestLimits:
    """The parts of `TeacherInfo` that bound one Score request."""

    vocab_size: int
    hidden_size: int
    max_seq_len: int
    max_batch_tokens: int
    max_top_k: int
    max_response_bytes: int

    @classmethod
    def from_info(cls, info: pb.TeacherInfo) -> RequestLimits:
        return cls(
            info.tokenizer_size,
            info.hidden_size,
            info.max_seq_len,
            info.max_batch_tokens,
            info.max_top_k,
            info.max_response_bytes,
        )

    def row_bytes(self, request: SignalRequest, wire_dtype: int) -> int:
        item = WIRE_DTYPES[wire_dtype].itemsize
        size = self.hidden_size * item if request.hidden_states else 0
        if request.top_k:
            size += min(request.top_k, self.vocab_size) * (4 + item) + 4
        if request.logits:
            size += self.vocab_size * item
        return size


@dataclass
class ScorePlan:
    batch_size: int
    rows_per_sequence: torch.Tensor  # (B,) int64
    order: torch.Tensor | None  # permutation that sorted the caller's rows by sequence; None if already sorted
    messages: list[pb.ScoreRequest]
    request: SignalRequest
    num_rows: int


def plan_score(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    rows: torch.Tensor,
    request: SignalRequest,
    limits: RequestLimits,
    wire_dtype: int,
) -> ScorePlan:
    if request.empty:
        raise TeacherError("score: the SignalRequest asks for nothing; set hidden_states, top_k or logits")
    if request.top_k > limits.max_top_k:
        raise TeacherError(
            f"score: top_k {request.top_k} exceeds the teacher's max_top_k {limits.max_top_k}; lower it or restart the server with a larger --max-top-k"
        )
    # numpy, not torch: these are a few small host arrays, where each torch op costs several times more.
    ids = input_ids.detach().cpu().numpy()
    mask = attention_mask.detach().cpu().numpy().astype(bool)
    rows = rows.detach().cpu().numpy().astype(np.int64).reshape(-1)
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise TeacherError(
            f"score: input_ids {tuple(ids.shape)} and attention_mask {tuple(mask.shape)} must be the same (B, T) shape"
        )
    batch, width = ids.shape
    lengths = mask.sum(1)
    starts = np.where(lengths > 0, mask.argmax(1), 0)
    span = np.arange(width)
    holes = mask != ((span >= starts[:, None]) & (span < (starts + lengths)[:, None]))
    if holes.any():
        raise TeacherError(
            f"score: attention_mask row {int(holes.any(1).argmax())} has holes; a remote teacher needs each sequence as one run of tokens (left or right padding)"
        )
    if batch and lengths.max() > limits.max_seq_len:
        b = int(lengths.argmax())
        raise TeacherError(
            f"score: sequence {b} has {int(lengths[b])} tokens, more than the teacher's max_seq_len {limits.max_seq_len}; truncate the data or restart the server with a larger --max-seq-len"
        )
    packed = ids[mask]
    out_of_vocab = (packed < 0) | (packed >= limits.vocab_size)
    if out_of_vocab.any():
        raise TeacherError(
            f"score: token id {int(packed[out_of_vocab][0])} is outside the teacher's vocabulary [0, {limits.vocab_size}); tokenize with the teacher's tokenizer"
        )
    if rows.size and (rows.min() < 0 or rows.max() >= batch * width):
        raise TeacherError(f"score: rows must be flat positions in [0, {batch * width}) of the ({batch}, {width}) ids")
    seq, column = np.divmod(rows, width)
    pos = column - starts[seq]
    padding = (pos < 0) | (pos >= lengths[seq])
    if padding.any():
        raise TeacherError(
            f"score: row {int(rows[padding][0])} points at padding; ask only for positions of real tokens"
        )
    order = None
    if seq.size > 1 and (seq[1:] < seq[:-1]).any():
        order = np.argsort(seq, kind="stable")
        seq, pos = seq[order], pos[order]
    counts = np.bincount(seq, minlength=batch)
    messages = _split(packed, lengths, pos, counts, request, limits, wire_dtype)
    return ScorePlan(
        batch,
        torch.from_numpy(counts.astype(np.int64)),
        None if order is None else torch.from_numpy(order),
        messages,
        request,
        int(rows.size),
    )


def _split(
    packed, lengths, positions, counts, request: SignalRequest, limits: RequestLimits, wire_dtype: int
) -> list[pb.ScoreRequest]:
    """Requests of whole sequences, each within max_batch_tokens and max_response_bytes.

    Sequences without requested rows are not sent at all: the teacher's forward would be wasted on them.
    """
    outputs = pb.OutputSpec(
        hidden_states=request.hidden_states, top_k=request.top_k, logits=request.logits, wire_dtype=wire_dtype
    )
    row_bytes = limits.row_bytes(request, wire_dtype)
    keep = counts > 0
    if not keep.all():
        packed = packed[np.repeat(keep, lengths)]
        lengths, counts = lengths[keep], counts[keep]
    if not lengths.size:
        return []
    if int(counts.max()) * row_bytes > limits.max_response_bytes:
        raise TeacherError(
            f"score: one sequence's answer exceeds the teacher's max_response_bytes {limits.max_response_bytes}; ask for top_k instead of logits"
        )
    bounds: list[int] = [0]  # sequence index where each request starts
    longest = rows_in = 0
    for b, (length, count) in enumerate(zip(lengths.tolist(), counts.tolist())):
        n, width, more_rows = b - bounds[-1] + 1, max(longest, length), rows_in + count
        if n > 1 and (n * width > limits.max_batch_tokens or more_rows * row_bytes > limits.max_response_bytes):
            bounds.append(b)
            width, more_rows = length, count
        longest, rows_in = width, more_rows
    bounds.append(len(lengths))
    token_ends = [0, *np.cumsum(lengths).tolist()]
    row_ends = [0, *np.cumsum(counts).tolist()]
    return [
        pb.ScoreRequest(
            tokens=pb.PackedTokens(
                ids=int32_bytes(packed[token_ends[a] : token_ends[b]]), lengths=lengths[a:b].tolist()
            ),
            positions=int32_bytes(positions[row_ends[a] : row_ends[b]]),
            position_counts=counts[a:b].tolist(),
            outputs=outputs,
        )
        for a, b in pairwise(bounds)
    ]


def assemble_signal(plan: ScorePlan, parts: list[dict[str, torch.Tensor]], device: torch.device | str) -> TeacherSignal:
    """One TeacherSignal from the decoded answers of `plan.messages`, in the caller's row order, on `device`."""
    names = parts[0].keys() if parts else ()

    def joined(name: str, dtype: torch.dtype) -> torch.Tensor:
        t = torch.cat([p[name] for p in parts]) if len(parts) > 1 else parts[0][name]
        t = t.to(dtype)
        if plan.order is not None:
            unsorted = torch.empty_like(t)
            unsorted[plan.order] = t
            t = unsorted
        return t.to(device, non_blocking=True)

    signal = TeacherSignal(rows_per_sequence=plan.rows_per_sequence.to(device))
    if "hidden_states" in names:
        signal.hidden_states = joined("hidden_states", torch.float32)
    if "topk_ids" in names:
        signal.topk_ids = joined("topk_ids", torch.int64)
        signal.topk_logprobs = joined("topk_logprobs", torch.float32)
        signal.tail_logmass = joined("tail_logmass", torch.float32)
    if "logits" in names:
        signal.logits = joined("logits", torch.float32)
    return signal


def empty_signal(plan: ScorePlan, limits: RequestLimits, device: torch.device | str) -> TeacherSignal:
    """The answer for a batch with no rows: correctly shaped empty tensors, without a call."""
    r = plan.request
    signal = TeacherSignal(rows_per_sequence=plan.rows_per_sequence.to(device))
    if r.hidden_states:
        signal.hidden_states = torch.zeros((0, limits.hidden_size), device=device)
    if r.top_k:
        k = min(r.top_k, limits.vocab_size)
        signal.topk_ids = torch.zeros((0, k), dtype=torch.int64, device=device)
        signal.topk_logprobs = torch.zeros((0, k), device=device)
        signal.tail_logmass = torch.zeros((0,), device=device)
    if r.logits:
        signal.logits = torch.zeros((0, limits.vocab_size), device=device)
    return signal
