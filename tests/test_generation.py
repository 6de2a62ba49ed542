"""`sample_continuations`, the sampler behind evaluation, on-policy batches and teacher samples.

A model whose embedding table is padded beyond its tokenizer (real checkpoints pad to a multiple of 64 or 128)
gives its untrained rows probability; the sampler must never emit them. The test pads a tiny Llama over the real
TinyLlama tokenizer to twice the tokenizer's size, so that without the mask about half of all sampled ids would
be padding rows.
"""

from __future__ import annotations

import pytest
import torch
from cross_vocab_models import tiny_llama
from policy_setup import tokenizer

from dskd.models.generation import PaddedRowsMask, sample_continuations

PROMPTS = [[1, 450, 1234, 310], [1, 29871, 13], [1, 22172]]


@pytest.fixture(scope="module")
def padded_model():
    tok = tokenizer("tinyllama")
    return tok, tiny_llama(2 * len(tok), hidden=16, head_scale=1.0)


def test_sampling_never_emits_a_padded_head_row(padded_model):
    tok, model = padded_model
    rows = sample_continuations(model, tok, PROMPTS * 4, max_new_tokens=24, temperature=1.0, seed=3)
    sampled = [i for row in rows for i in row]
    assert len(sampled) > 100, "setup: too few sampled ids to see padded rows"
    assert max(sampled) < len(tok)


def test_the_mask_is_what_keeps_padded_rows_out(padded_model):
    """The same sampling without the mask does draw padded rows: the first test could otherwise pass vacuously."""
    tok, model = padded_model
    torch.manual_seed(3)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([PROMPTS[0]])).logits[0, -1]
    padded_share = torch.softmax(logits, -1)[len(tok) :].sum()
    assert padded_share > 0.3
    masked = PaddedRowsMask(len(tok))(torch.tensor([PROMPTS[0]]), logits[None].clone())
    assert torch.isneginf(masked[0, len(tok) :]).all() and torch.equal(masked[0, : len(tok)], logits[: len(tok)])


def test_no_mask_when_the_head_matches_the_tokenizer():
    tok = tokenizer("tinyllama")
    assert PaddedRowsMask.for_model(tiny_llama(len(tok), hidden=16), len(tok)) is None
