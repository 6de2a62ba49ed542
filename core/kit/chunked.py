"""Losses over packed valid tokens, computed in chunks of rows, with their gradients taken chunk by chunk.

A dual-space loss needs full-vocabulary logits in two spaces for every valid token: at a 150k vocabulary
and 2k tokens that is over a gigabyte per float32 copy, and a divergence makes several copies. Here the
caller gives a function that computes the (already weighted) loss of a few rows, and `chunked_loss` runs it
on `chunk_size` rows at a time. For each chunk it computes the loss *and its gradients* at once, then frees
the chunk's logits; the gradients with respect to the inputs are small (rows x hidden size, plus any shared
weights) and are kept for the backward pass, which only scales them by the incoming gradient.

So peak memory is O(chunk x vocabulary) instead of O(tokens x vocabulary), and nothing is recomputed: the
work equals that of the dense computation (a recompute-in-backward checkpoint would redo every logit
matrix, about 1.5x the time for DSKD). The price is that the loss must be a scalar whose weights (kd rate,
loss denominator) are known before the call, which the engine guarantees (spec §0), and that the result is
differentiated once (no double backward).

The loss function sees ordinary tensors and may call any divergence; `dense_loss` runs the same function on
all rows at once and is the oracle the tests and benchmarks compare against.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from dskd.kit.weights import LossWeights, current_weighing

CHUNK_ELEMENTS = 1 << 24
"""Elements of one float32 `(rows, V)` chunk buffer under the automatic chunk size: 64 MiB."""


def auto_chunk_rows(vocab_sizes: Sequence[int | None], hidden_sizes: Sequence[int | None] = ()) -> int:
    """Rows per loss chunk for LM heads of these vocabularies and hidden sizes (`train.chunk_size = 0`).

    Memory bounds the rows from above: one float32 `(rows, V)` buffer is at most 64 MiB at the largest
    vocabulary, and a divergence keeps a handful of them live, far below the dense computation's peak. The hidden
    size bounds them from below: every chunk allocates and adds a `(V, d)` gradient of the trainable head, a
    fixed cost per chunk, so at least `d / 2` rows keep it to about two of the chunk's twenty-odd passes over
    `(rows, V)` (at a 152k vocabulary 64 MiB would be 110 rows, and the head's gradient alone three times the
    chunk's logits). Small chunks also make the matmuls of the heads less efficient. Between 32 and 4096 rows.
    """
    vocab = max((v for v in vocab_sizes if v), default=32000)
    hidden = max((d for d in hidden_sizes if d), default=0)
    return int(min(max(CHUNK_ELEMENTS // vocab, (hidden + 1) // 2, 32), 4096))


ChunkFn = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""`fn(rows, shared) -> (loss, stats)`: `rows` are chunk slices of the row inputs (first dimension = rows),
`shared` the inputs every chunk sees whole; `loss` is a scalar, `stats` detached tensors summed over chunks."""


def dense_loss(
    fn: ChunkFn, rows: Mapping[str, torch.Tensor], shared: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The same computation on all rows at once, with ordinary autograd (the oracle)."""
    loss, stats = fn(dict(rows), dict(shared))
    return loss, {k: v.detach() for k, v in stats.items()}


def chunked_loss(
    fn: ChunkFn,
    rows: Mapping[str, torch.Tensor],
    shared: Mapping[str, torch.Tensor],
    *,
    chunk_size: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum of `fn` over row chunks, differentiable with respect to every tensor in `rows` and `shared`.

    Every tensor that must receive a gradient has to be passed in `rows` or `shared`: parameters captured
    by `fn` from outside are treated as constants. Non-float tensors (labels, masks, indices) may be passed
    as rows too; they are simply sliced.
    """
    row_names = list(rows)
    shared_names = list(shared)
    if not row_names:
        raise ValueError("chunked_loss needs at least one row input")
    n = int(rows[row_names[0]].shape[0])
    for name in row_names:
        if int(rows[name].shape[0]) != n:
            raise ValueError(f"row input {name!r} has {rows[name].shape[0]} rows, expected {n}")
    stats: dict[str, torch.Tensor] = {}
    loss = _ChunkedLoss.apply(
        fn, row_names, shared_names, max(1, int(chunk_size)), stats, *rows.values(), *shared.values()
    )
    return loss, stats


class _ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, row_names, shared_names, chunk_size, stats_out, *tensors):  # type: ignore[override]
        row_inputs = tensors[: len(row_names)]
        shared_inputs = tensors[len(row_names) :]
        n = int(row_inputs[0].shape[0])
        needs = [t.requires_grad and t.is_floating_point() for t in tensors]
        # Shared inputs become leaves once; their per-chunk gradients are summed in float32 (a bf16 running
        # sum over many chunks would drift).
        shared_leaves = [t.detach().requires_grad_(need) for t, need in zip(shared_inputs, needs[len(row_names) :])]
        shared_grads: list[torch.Tensor | None] = [None] * len(shared_inputs)
        row_grads = [torch.zeros_like(t) if need else None for t, need in zip(row_inputs, needs[: len(row_names)])]
        total = torch.zeros((), dtype=torch.float32, device=row_inputs[0].device)
        for start in range(0, max(n, 1), chunk_size):
            stop = min(start + chunk_size, n)
            leaves = [
                t[start:stop].detach().requires_grad_(need) for t, need in zip(row_inputs, needs[: len(row_names)])
            ]
            with torch.enable_grad():
                loss, chunk_stats = fn(dict(zip(row_names, leaves)), dict(zip(shared_names, shared_leaves)))
            wanted = [leaf for leaf, need in zip(leaves + shared_leaves, needs) if need]
            if wanted and loss.requires_grad:
                grads = iter(torch.autograd.grad(loss, wanted, allow_unused=True))
                for i, need in enumerate(needs[: len(row_names)]):
                    g = next(grads) if need else None
                    if g is not None:
                        row_grads[i][start:stop] = g
                for i, need in enumerate(needs[len(row_names) :]):
                    g = next(grads) if need else None
                    if g is not None:
                        # The first chunk's gradient becomes the float32 accumulator (no zero-filled copy).
                        shared_grads[i] = g.float() if shared_grads[i] is None else shared_grads[i].add_(g)
            total += loss.detach().float()
            for key, value in chunk_stats.items():
                value = value.detach()
                stats_out[key] = stats_out[key] + value if key in stats_out else value.clone()
            del loss, chunk_stats, leaves
        shared_grads = [None if g is None else g.to(t.dtype) for g, t in zip(shared_grads, shared_inputs)]
        ctx.grads = row_grads + shared_grads
        return total

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        # In place: the stored gradients are not used again, and a second weight-sized buffer would count
        # against the loss's peak memory.
        grads = [None if g is None else g.mul_(grad_output.to(g.dtype)) for g in ctx.grads]
        ctx.grads = None  # free the stored gradients as soon as they are handed on
        return (None, None, None, None, None, *grads)


PartsFn = Callable[
    [dict[str, torch.Tensor], dict[str, torch.Tensor]], tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]
]
"""`fn(rows, shared) -> (parts, stats)`: `parts` maps a loss part's name to its (unweighted) scalar sum over the
chunk's rows; `stats` are detached tensors summed over chunks (counts, agreement)."""

_PART = "\0part:"  # stats key prefix that carries each part's value out of `chunked_loss`


def chunked_parts(
    fn: PartsFn,
    rows: Mapping[str, torch.Tensor],
    shared: Mapping[str, torch.Tensor],
    *,
    chunk_size: int,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-part sums of `fn` over row chunks, for an objective's `LossTerms.parts`; also `fn`'s summed stats.

    Each chunk's gradients are taken at once (see `chunked_loss`), so they must be those of the weighted sum of
    the parts. Inside the engine (`dskd.kit.weighting`) the weights in force are used, the weighted loss with
    its gradients goes to the engine, and the parts come back as plain values. Outside it, every part counts
    once and the returned parts are differentiable: each carries its value, and together their sum carries
    the gradient of the summed parts (so sum them before back-propagating; one part alone is not its own
    gradient).
    """
    weighing = current_weighing()
    weights = weighing.weights if weighing is not None else LossWeights()

    def weighted(r: dict, s: dict):
        parts, stats = fn(r, s)
        stats = dict(stats)
        stats.update({_PART + name: value.detach() for name, value in parts.items()})
        return weights.combine(parts), stats

    loss, stats = chunked_loss(weighted, rows, shared, chunk_size=chunk_size)
    values = {key[len(_PART) :]: stats.pop(key) for key in [k for k in stats if k.startswith(_PART)]}
    if weighing is not None:
        weighing.carry(loss, frozenset(values))
        return values, stats
    if not loss.requires_grad:
        return values, stats
    # Outside the engine: each part's value, plus an equal share of the summed loss's gradient
    # (`loss - loss.detach()` is exactly zero, so the values are untouched).
    delta = (loss - loss.detach()) / len(values)
    return {name: value + delta for name, value in values.items()}, stats
