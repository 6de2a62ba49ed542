"""The SmolLM2 reproduction's teacher memory: the signal of a remembered sequence is the teacher's own signal, and
a sequence is run through the model once however many batches and runs ask for it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from tiny_gguf import tiny_llama

from dskd.models.teacher import LocalTeacher
from dskd.types import SignalRequest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce_smollm2.py"
TOKENIZERS = Path(__file__).resolve().parents[1] / "examples" / "tokenizers"


def load_script():
    spec = importlib.util.spec_from_file_location("reproduce_smollm2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_remembered_sequences_give_the_local_teachers_signal_and_run_once():
    from transformers import AutoTokenizer

    memo_teacher = load_script().MemoTeacher
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "gpt2")
    model = tiny_llama(seed=3, layers=1)
    local, memo = LocalTeacher(model, tokenizer), memo_teacher(model, tokenizer)
    ids = torch.randint(0, 50257, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding, as the data loader pads
    mask[2, 10:] = 0
    rows = torch.nonzero(mask.reshape(-1)).reshape(-1)
    request = SignalRequest(hidden_states=True, top_k=5, logits=True)
    expected = local.score(ids, mask, rows, request)
    first = memo.score(ids, mask, rows, request)
    assert memo.forward_tokens == int(mask.sum())
    # The same sequences in another order and with other padding: answered from memory.
    order = torch.tensor([2, 0, 1])
    ids2, mask2 = ids[order].clone(), mask[order].clone()
    ids2[mask2 == 0] = 7
    rows2 = torch.nonzero(mask2.reshape(-1)).reshape(-1)
    again = memo.score(ids2, mask2, rows2, request)
    assert memo.forward_tokens == int(mask.sum())
    for name in ("hidden_states", "topk_ids", "topk_logprobs", "tail_logmass", "logits"):
        torch.testing.assert_close(getattr(first, name), getattr(expected, name), rtol=1e-5, atol=1e-5)
        # DSKD projects the teacher's hidden states with trained weights: they must be usable by autograd.
        assert not getattr(first, name).is_inference() and not getattr(again, name).is_inference()
    # Rows of sequence b in the reordered batch: the same values as in the first batch.
    per_sequence = [mask[b].sum().item() for b in range(3)]
    starts = [0, per_sequence[0], per_sequence[0] + per_sequence[1]]
    pieces = [expected.logits[starts[b] : starts[b] + per_sequence[b]] for b in order.tolist()]
    torch.testing.assert_close(again.logits, torch.cat(pieces), rtol=1e-5, atol=1e-5)
