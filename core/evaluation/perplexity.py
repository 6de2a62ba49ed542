"""Per-byte perplexity of a causal LM on plain text: comparable across tokenizers.

Per-token perplexity rewards a tokenizer that cuts text into more, easier pieces; dividing the summed negative
log-likelihood by the text's UTF-8 bytes instead measures how well a model predicts the *text*, so a student with
GPT-2's tokenizer and one with SmolLM2's compare fairly.

Each document is read after the tokenizer's EOS token (a document boundary, so its first token is predicted too).
A document longer than `window` tokens is read in windows that advance by `stride` tokens, each scoring only its
new tokens with up to `window - stride` tokens of earlier context (the usual sliding-window evaluation).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from dskd.errors import DataError


@torch.no_grad()
def text_nll(model: torch.nn.Module, ids: list[int], *, window: int = 512, stride: int = 384) -> float:
    """Summed negative log-likelihood (nats) of `ids[1:]` given what precedes each token (at most `window - 1`
    tokens of it; `ids[0]` is context only)."""
    if stride < 1 or stride >= window:
        raise ValueError(f"stride must be in [1, window), got stride={stride}, window={window}")
    device = next(model.parameters()).device
    total = 0.0
    scored = 1  # ids[0] is never predicted
    while scored < len(ids):
        end = min(scored + stride, len(ids))
        start = max(0, end - window)
        chunk = torch.tensor([ids[start:end]], device=device)
        logits = model(chunk).logits[0].float()
        # Position p predicts token p + 1; score only the tokens not scored by an earlier window.
        first = scored - start
        logprobs = torch.log_softmax(logits[first - 1 : end - start - 1], -1)
        targets = chunk[0, first : end - start]
        total -= float(logprobs.gather(1, targets[:, None]).sum())
        scored = end
    return total


def per_byte_perplexity(
    model: torch.nn.Module, tokenizer, texts: Iterable[str], *, window: int = 512, stride: int = 384
) -> dict[str, float]:
    """`perplexity_per_byte` = exp(NLL / bytes) and `bits_per_byte` over all `texts`, with the totals."""
    was_training = model.training
    model.eval()
    nll, nbytes, ntokens = 0.0, 0, 0
    try:
        for text in texts:
            if not text:
                continue
            ids = [tokenizer.eos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
            nll += text_nll(model, ids, window=window, stride=stride)
            nbytes += len(text.encode("utf-8"))
            ntokens += len(ids) - 1
    finally:
        model.train(was_training)
    if nbytes == 0:
        raise DataError("per-byte perplexity: every text is empty; give held-out text to measure on")
    return {
        "perplexity_per_byte": math.exp(nll / nbytes),
        "bits_per_byte": nll / nbytes / math.log(2),
        "nll": nll,
        "bytes": nbytes,
        "tokens": ntokens,
    }
