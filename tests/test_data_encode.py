"""`encode_example` / `encode_prompt` with the three bundled real tokenizers: the prompt/response boundary,
labels that decode to exactly the response, left truncation and the length and tokenizer errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dskd.config import DataConfig
from dskd.data.examples import encode_example, encode_prompt, load_examples, render_prompt
from dskd.errors import DataError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NAMES = ["gpt2", "tinyllama", "mistral"]
PROMPT = render_prompt("Answer the question.", "", "alpaca")
RESPONSES = [
    "Paris",
    "7 apples. café",
    "Hello, world!\nSecond line.",
    "multi\n\n\nnewlines and\ttabs",
    "😀 emoji and 日本語",
    "x </s> y <s> z <|endoftext|>",  # special-token strings in the text are text, not control tokens
    "ends with a space ",
    "A",
]


@pytest.fixture(scope="module")
def tokenizers():
    return {name: AutoTokenizer.from_pretrained(EXAMPLES / "tokenizers" / name) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_labels_decode_to_exactly_the_response_and_eos(tokenizers, name):
    tok = tokenizers[name]
    cfg = DataConfig()
    bundled = [e.response for e in load_examples(EXAMPLES / "data" / "tasks" / "valid.jsonl", cfg, "valid")]
    for response in RESPONSES + bundled:
        ids, prompt_len = encode_example(tok, PROMPT, response, cfg)
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids[prompt_len:], clean_up_tokenization_spaces=False) == response + tok.eos_token
        # The only special tokens are the tokenizer's own BOS and the appended EOS.
        specials = [i for i in ids if i in tok.all_special_ids]
        assert specials == ([tok.bos_token_id] if ids[0] == tok.bos_token_id and name != "gpt2" else []) + [
            tok.eos_token_id
        ]


@pytest.mark.parametrize("name", NAMES)
def test_prompt_tokens_decode_to_the_prompt_and_bos_follows_the_tokenizer(tokenizers, name):
    tok = tokenizers[name]
    ids, prompt_len = encode_example(tok, PROMPT, "Paris", DataConfig())
    has_bos = name != "gpt2"  # Llama and Mistral add BOS; GPT-2 adds nothing
    assert (ids[0] == tok.bos_token_id) is has_bos
    assert tok.decode(ids[int(has_bos) : prompt_len], clean_up_tokenization_spaces=False) == PROMPT


@pytest.mark.parametrize("name", ["tinyllama", "mistral"])
def test_joint_tokenisation_gives_no_spurious_leading_space_piece(tokenizers, name):
    tok = tokenizers[name]
    ids, prompt_len = encode_example(tok, PROMPT, "Paris", DataConfig())
    first = tok.convert_ids_to_tokens(ids[prompt_len])
    assert not first.startswith("▁")
    # The reference's separate encoding of the response (DSKD_SPEC §10.2) does start with "▁".
    assert tok.convert_ids_to_tokens(tok.encode("Paris", add_special_tokens=False))[0].startswith("▁")


@pytest.mark.parametrize("name", NAMES)
def test_training_prompt_ids_equal_the_inference_prompt_ids_on_the_bundled_data(tokenizers, name):
    tok, cfg = tokenizers[name], DataConfig()
    for example in load_examples(EXAMPLES / "data" / "tasks" / "test.jsonl", cfg, "test"):
        ids, prompt_len = encode_example(tok, example.prompt, example.response, cfg)
        assert ids[:prompt_len] == encode_prompt(tok, example.prompt, cfg)


@pytest.mark.parametrize("name", NAMES)
def test_long_prompt_keeps_its_last_tokens_and_bos(tokenizers, name):
    tok = tokenizers[name]
    prompt = render_prompt(" ".join(f"word{i}" for i in range(400)), "", "alpaca")
    cfg = DataConfig(max_length=128, max_prompt_length=32)
    ids, prompt_len = encode_example(tok, prompt, "Paris", cfg)
    assert prompt_len == 32
    full = tok(prompt, add_special_tokens=False)["input_ids"]
    if name == "gpt2":
        assert ids[:32] == full[-32:]
    else:
        assert ids[0] == tok.bos_token_id and ids[1:32] == full[-31:]
    assert tok.decode(ids[:prompt_len]).endswith("### Response:\n")
    assert tok.decode(ids[prompt_len:], clean_up_tokenization_spaces=False) == "Paris" + tok.eos_token
    assert encode_prompt(tok, prompt, cfg) == ids[:prompt_len]


@pytest.mark.parametrize("name", ["gpt2", "tinyllama"])
def test_prompt_within_the_limit_is_not_truncated_at_any_limit(tokenizers, name):
    tok = tokenizers[name]
    ids, prompt_len = encode_example(tok, PROMPT, "Paris", DataConfig())
    for limit in range(1, prompt_len + 3):
        cut_ids, cut_len = encode_example(tok, PROMPT, "Paris", DataConfig(max_prompt_length=limit))
        keep = min(limit, prompt_len)
        assert cut_len == keep
        assert cut_ids[cut_len:] == ids[prompt_len:]
        if name == "gpt2":
            assert cut_ids[:cut_len] == ids[prompt_len - keep : prompt_len]
        else:  # BOS first, then the prompt's last tokens
            assert cut_ids[:cut_len] == ids[:1] + ids[prompt_len - keep + 1 : prompt_len]


def test_too_long_sample_names_split_index_length_and_fix(tokenizers):
    tok = tokenizers["gpt2"]
    ids, _ = encode_example(tok, PROMPT, "one two three", DataConfig())
    limit = len(ids) - 1
    cfg = DataConfig(max_length=limit, max_prompt_length=limit - 1)
    with pytest.raises(DataError) as excinfo:
        encode_example(tok, PROMPT, "one two three", cfg, split="valid", index=7)
    message = str(excinfo.value)
    assert "\n" not in message
    assert "data.valid, sample 7" in message and f"{len(ids)} tokens" in message
    assert f"data.max_length = {limit}" in message and "raise data.max_length or drop that sample" in message
    assert (
        encode_example(tok, PROMPT, "one two three", DataConfig(max_length=len(ids), max_prompt_length=limit - 1))[0]
        == ids
    )


def test_tokenizer_without_fast_backend_is_refused(tokenizers):
    class SlowTokenizer:
        is_fast = False
        name_or_path = "slow-tok"
        eos_token_id = 2

    with pytest.raises(DataError, match="'slow-tok' has no fast backend.*tokenizer.json"):
        encode_example(SlowTokenizer(), PROMPT, "Paris", DataConfig())


def test_token_spanning_prompt_and_response_is_refused_with_the_fix(tokenizers):
    # GPT-2 merges a template's trailing space with the answer ("Ġ7"), so no boundary exists between them.
    with pytest.raises(DataError) as excinfo:
        encode_example(tokenizers["gpt2"], "Answer: ", "7", DataConfig(), split="train", index=3)
    message = str(excinfo.value)
    assert "sample 3" in message and "'Ġ7'" in message and "trailing whitespace" in message
    ids, prompt_len = encode_example(tokenizers["gpt2"], "Answer:", " 7", DataConfig())
    assert tokenizers["gpt2"].convert_ids_to_tokens(ids[prompt_len:]) == ["Ġ7", "<|endoftext|>"]


def test_empty_prompt_without_bos_is_refused(tokenizers):
    with pytest.raises(DataError, match="prompt is empty"):
        encode_example(tokenizers["gpt2"], "", "Paris", DataConfig())
    ids, prompt_len = encode_example(tokenizers["tinyllama"], "", "Paris", DataConfig())
    assert prompt_len == 1 and ids[0] == 1  # BOS alone is a prompt the first response token can follow
