"""Per-byte perplexity: the sliding-window NLL equals a token-by-token computation with the same contexts, and
the per-byte figure is that NLL over the text's UTF-8 bytes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dskd.errors import DataError
from dskd.evaluation.perplexity import per_byte_perplexity, text_nll

TOKENIZERS = Path(__file__).resolve().parents[1] / "examples" / "tokenizers"


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "gpt2")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


def reference_nll(model, ids: list[int], window: int, stride: int) -> float:
    """Each token alone, with exactly the context the sliding window gives it."""
    total, scored = 0.0, 1
    while scored < len(ids):
        end = min(scored + stride, len(ids))
        start = max(0, end - window)
        for position in range(scored, end):
            with torch.no_grad():
                logits = model(torch.tensor([ids[start:position]])).logits[0, -1].double()
            total -= float(torch.log_softmax(logits, -1)[ids[position]])
        scored = end
    return total


@pytest.mark.parametrize("window,stride", [(64, 63), (16, 8), (10, 3)])
def test_sliding_window_nll_equals_the_token_by_token_computation(model_and_tokenizer, window, stride):
    model, tokenizer = model_and_tokenizer
    ids = [tokenizer.eos_token_id, *tokenizer("def f(x):\n    return x ** 2  # Über squares")["input_ids"]]
    assert len(ids) > window or window == 64  # the small windows really slide
    got = text_nll(model, ids, window=window, stride=stride)
    assert got == pytest.approx(reference_nll(model, ids, window, stride), rel=1e-5)


def test_per_byte_perplexity_divides_the_nll_by_utf8_bytes(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    texts = ["Über alles: 2 lines\nhere.", "", "x = 1"]
    out = per_byte_perplexity(model, tokenizer, texts, window=64, stride=32)
    nll = sum(
        text_nll(model, [tokenizer.eos_token_id, *tokenizer(t)["input_ids"]], window=64, stride=32) for t in texts if t
    )
    assert out["bytes"] == len("Über alles: 2 lines\nhere.".encode()) + 5
    assert out["nll"] == pytest.approx(nll)
    assert out["perplexity_per_byte"] == pytest.approx(math.exp(nll / out["bytes"]))
    assert out["bits_per_byte"] == pytest.approx(nll / out["bytes"] / math.log(2))


def test_no_text_to_measure_is_a_data_error(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(DataError, match="every text is empty"):
        per_byte_perplexity(model, tokenizer, ["", ""])
