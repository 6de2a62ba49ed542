"""Sampling continuations from an HF causal LM: used by evaluation, on-policy policies and teacher samples."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList


class PaddedRowsMask(LogitsProcessor):
    """Never sample an id the tokenizer does not have.

    Embedding tables are often padded beyond the tokenizer (to a multiple of 64 or 128 for speed); their rows
    are untrained, but a sampler still gives them probability. Such an id decodes to nothing, so an on-policy
    sample would carry a token that neither the teacher's re-tokenisation nor the labels can account for.
    """

    def __init__(self, tokenizer_size: int) -> None:
        self.tokenizer_size = tokenizer_size

    @classmethod
    def for_model(cls, model: torch.nn.Module, tokenizer_size: int) -> PaddedRowsMask | None:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        rows = head.weight.shape[0] if head is not None else getattr(model.config, "vocab_size", 0)
        return cls(tokenizer_size) if rows > tokenizer_size else None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        masked = scores.clone()  # processors return new scores; the caller's tensor is left as it was
        masked[:, self.tokenizer_size :] = float("-inf")
        return masked


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded `(B, T)` ids and attention mask (generation continues from the right edge)."""
    width = max((len(p) for p in prompts), default=0)
    ids = torch.full((len(prompts), max(width, 1)), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
    return ids, mask


@torch.inference_mode()
def sample_continuations(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    stop_ids: Sequence[int] = (),
) -> list[list[int]]:
    """Continuations of each prompt, up to and including the first EOS (or the first of `stop_ids`, when given: a
    chat template's end-of-turn token).

    `temperature == 0` is greedy decoding. Sampling runs in eval mode (no dropout; spec §14.16) with its own
    seeded RNG, so it neither depends on nor disturbs the training RNG streams.
    """
    if not prompts:
        return []
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    stops = [int(i) for i in stop_ids] or ([] if eos is None else [eos])
    device = next(model.parameters()).device
    padded = PaddedRowsMask.for_model(model, len(tokenizer))
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                ids, mask = left_pad(chunk, pad)
                kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=stops if stop_ids else eos)
                if padded:
                    kwargs.update(logits_processor=LogitsProcessorList([padded]))
                if temperature > 0:
                    kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
                else:
                    kwargs.update(do_sample=False)
                generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
                for row in generated[:, ids.shape[1] :].tolist():
                    ends = [row.index(stop) for stop in stops if stop in row]
                    if ends:
                        row = row[: min(ends) + 1]
                    out.append(row)
    finally:
        model.train(was_training)
    return out
