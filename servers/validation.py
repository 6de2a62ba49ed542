"""Checks on every request before it reaches the model, and the limits they enforce.

A bad request must cost the server nothing but a reply: it is refused here, in the gRPC handler, with
`INVALID_ARGUMENT` and a message that names the offending field, so one client's bug never takes the model
worker (and every other client) down. The checks are vectorised over the packed arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dskd.protos import teacher_pb2 as pb
from dskd.servers.wire import MAX_MESSAGE_BYTES, WIRE_DTYPES, Packed, int32_array
from dskd.types import SignalRequest

SCORE_DTYPES = (pb.BF16, pb.FP32)


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask of this server (advertised in `GetInfo`)."""

    vocab_size: int  # ids must be in [0, vocab_size): the tokenizer's size
    hidden_size: int
    max_seq_len: int = 2048
    max_batch_tokens: int = 16384  # sequences * longest length, per request and per merged forward
    max_top_k: int = 128
    max_response_bytes: int = 256 * 1024 * 1024
    max_new_tokens: int = 512
    max_message_bytes: int = MAX_MESSAGE_BYTES


class RequestError(ValueError):
    """A request the server refuses; `str()` names the field, what is wrong, and how to fix it."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        super().__init__(f"{field}: {problem}")


@dataclass(frozen=True)
class ScoreInput:
    """A validated Score request, in native arrays."""

    tokens: Packed
    positions: np.ndarray  # (rows,) int64, position within its sequence
    counts: np.ndarray  # (num_sequences,) int64, positions per sequence
    request: SignalRequest
    wire_dtype: int

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.lengths.sum())

    @property
    def num_rows(self) -> int:
        return int(self.positions.shape[0])

    @property
    def padded_tokens(self) -> int:
        return int(len(self.tokens.lengths) * self.tokens.lengths.max())


def response_bytes(rows: int, request: SignalRequest, wire_dtype: int, limits: ServerLimits) -> int:
    """Bytes of the tensors a Score answer carries for `rows` rows."""
    item = WIRE_DTYPES[wire_dtype].itemsize
    per_row = 0
    if request.hidden_states:
        per_row += limits.hidden_size * item
    if request.top_k:
        per_row += min(request.top_k, limits.vocab_size) * (4 + item) + 4
    if request.logits:
        per_row += limits.vocab_size * item
    return rows * per_row


def validate_tokens(packed: pb.PackedTokens, field: str, limits: ServerLimits, *, max_len: int | None = None) -> Packed:
    lengths = np.asarray(packed.lengths, dtype=np.int64)
    if lengths.size == 0:
        raise RequestError(f"{field}.lengths", "is empty; send at least one sequence")
    if lengths.min() < 1:
        raise RequestError(
            f"{field}.lengths",
            f"sequence {int(np.argmin(lengths))} has length {int(lengths.min())}; every sequence needs at least one token",
        )
    longest = max_len if max_len is not None else limits.max_seq_len
    if lengths.max() > longest:
        raise RequestError(
            f"{field}.lengths",
            f"sequence {int(np.argmax(lengths))} has {int(lengths.max())} tokens, more than the {longest} allowed "
            f"(max_seq_len {limits.max_seq_len}, less max_new_tokens for prompts); truncate it",
        )
    data = packed.ids
    if len(data) != 4 * int(lengths.sum()):
        raise RequestError(
            f"{field}.ids",
            f"holds {len(data)} bytes but the lengths sum to {int(lengths.sum())} int32 ids ({4 * int(lengths.sum())} bytes)",
        )
    ids = int32_array(data)
    bad = (ids < 0) | (ids >= limits.vocab_size)
    if bad.any():
        where = int(np.argmax(bad))
        raise RequestError(
            f"{field}.ids",
            f"id {int(ids[where])} at packed index {where} is outside the teacher's vocabulary [0, {limits.vocab_size}); tokenize with the teacher's tokenizer",
        )
    return Packed(ids=ids, lengths=lengths)


def validate_score(request: pb.ScoreRequest, limits: ServerLimits) -> ScoreInput:
    """The request as native arrays, or a `RequestError` naming the first field that is wrong."""
    outputs = request.outputs
    wire_dtype = outputs.wire_dtype or pb.BF16
    if wire_dtype not in SCORE_DTYPES:
        raise RequestError("outputs.wire_dtype", f"value {outputs.wire_dtype} is not BF16 (1) or FP32 (3)")
    if not (outputs.hidden_states or outputs.top_k or outputs.logits):
        raise RequestError("outputs", "asks for nothing; set hidden_states, top_k or logits")
    if outputs.top_k > limits.max_top_k or outputs.top_k > limits.vocab_size:
        raise RequestError(
            "outputs.top_k",
            f"{outputs.top_k} exceeds this server's limit {min(limits.max_top_k, limits.vocab_size)}; ask for fewer",
        )
    tokens = validate_tokens(request.tokens, "tokens", limits)
    padded = int(len(tokens.lengths) * tokens.lengths.max())
    if padded > limits.max_batch_tokens:
        raise RequestError(
            "tokens",
            f"{len(tokens.lengths)} sequences of up to {int(tokens.lengths.max())} tokens make {padded} padded tokens, "
            f"more than max_batch_tokens {limits.max_batch_tokens}; split the batch",
        )
    counts = np.asarray(request.position_counts, dtype=np.int64)
    if counts.shape != tokens.lengths.shape:
        raise RequestError(
            "position_counts",
            f"has {counts.size} entries for {tokens.lengths.size} sequences; send one count per sequence",
        )
    if counts.size and counts.min() < 0:
        raise RequestError("position_counts", "has a negative count")
    if len(request.positions) != 4 * int(counts.sum()):
        raise RequestError(
            "positions",
            f"holds {len(request.positions)} bytes but position_counts sum to {int(counts.sum())} int32 positions",
        )
    positions = int32_array(request.positions)
    limit = np.repeat(tokens.lengths, counts)
    bad = (positions < 0) | (positions >= limit)
    if bad.any():
        where = int(np.argmax(bad))
        seq = int(np.searchsorted(np.cumsum(counts), where, side="right"))
        raise RequestError(
            "positions",
            f"position {int(positions[where])} of sequence {seq} is outside [0, {int(limit[where])}); positions index tokens of their own sequence",
        )
    signal = SignalRequest(hidden_states=outputs.hidden_states, top_k=int(outputs.top_k), logits=outputs.logits)
    size = response_bytes(int(counts.sum()), signal, wire_dtype, limits)
    if size > limits.max_response_bytes:
        raise RequestError(
            "outputs",
            f"the answer would take {size} bytes, more than max_response_bytes {limits.max_response_bytes}; ask for fewer rows or top_k instead of logits",
        )
    return ScoreInput(tokens=tokens, positions=positions, counts=counts, request=signal, wire_dtype=wire_dtype)


@dataclass(frozen=True)
class GenerateInput:
    prompts: list[list[int]]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int


def validate_generate(request: pb.GenerateRequest, limits: ServerLimits) -> GenerateInput:
    if request.max_new_tokens < 1 or request.max_new_tokens > limits.max_new_tokens:
        raise RequestError("max_new_tokens", f"{request.max_new_tokens} is outside [1, {limits.max_new_tokens}]")
    if not np.isfinite(request.temperature) or request.temperature < 0:
        raise RequestError("temperature", f"{request.temperature} must be >= 0 (0 = greedy)")
    # proto3 cannot tell an unset float from 0, and a nucleus of mass 0 means nothing: 0 is "no filter" (1).
    top_p = float(request.top_p) or 1.0
    if not (0 < top_p <= 1):
        raise RequestError("top_p", f"{request.top_p} must be in (0, 1] (or unset: no nucleus filter)")
    prompts = validate_tokens(
        request.prompts, "prompts", limits, max_len=limits.max_seq_len - int(request.max_new_tokens)
    )
    padded = int(len(prompts.lengths) * (prompts.lengths.max() + request.max_new_tokens))
    if padded > limits.max_batch_tokens:
        raise RequestError(
            "prompts",
            f"{padded} padded tokens with max_new_tokens exceed max_batch_tokens {limits.max_batch_tokens}; send fewer prompts",
        )
    return GenerateInput(
        prompts.sequences(), int(request.max_new_tokens), float(request.temperature), top_p, int(request.seed)
    )
