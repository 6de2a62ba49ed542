"""Tiny random models over two *different* real tokenizers, batches of the same texts built the way the data
loader builds them (`tokenize_split` + `collate` with a real aligner), and the plumbing that runs an objective
on them as the engine does.

Shared by the cross-tokenizer objective tests (`test_objective_uld.py`, `test_objective_mined_kd.py`,
`test_objective_cma.py`). Student: a 1-layer GPT-2 (hidden 16) over the GPT-2 tokenizer (50,257 tokens);
teacher: a 1-layer Llama (hidden 24) over the TinyLlama tokenizer (32,000 tokens). Dropout is off so two
forwards of the student agree exactly.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from objective_checks import assert_rel, gradients, log_softmax64, run_objective  # noqa: F401  (re-exported)
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from dskd.config import DataConfig
from dskd.data.batching import collate
from dskd.data.examples import Example, tokenize_split
from dskd.kit.lm_head import head_from_model
from dskd.kit.objective import ObjectiveContext
from dskd.models.teacher import LocalTeacher
from dskd.types import Batch

TOKENIZERS = Path(__file__).resolve().parents[1] / "examples" / "tokenizers"
STUDENT_HIDDEN = 16
TEACHER_HIDDEN = 24

# Responses of different lengths in the two tokenizers (longer on either side), with newlines, non-ASCII text
# and an emoji (byte pieces in Llama), so index pairs, padding and prompt positions all differ between sides.
EXAMPLES = [
    Example("### Instruction:\nSpell the word backwards.\n\n### Response:\n", ("hsif, of course",)),
    Example("### Instruction:\nGreet the reader.\n\n### Response:\n", ("Hi wörld 😀\nagain",)),  # 8 vs 12 tokens
    Example("Say hello in Russian.\n", ("Привет",)),  # 7 GPT-2 tokens, 2 TinyLlama tokens
]


@functools.cache
def tokenizer(name: str):
    """The project's bundled copy of a real tokenizer (loaded once per test session)."""
    return AutoTokenizer.from_pretrained(TOKENIZERS / name)


def scale_head(weight: torch.nn.Parameter, factor: float) -> None:
    """Random-init logits are tiny (every softmax nearly uniform, every loss nearly flat); scaling the head
    gives the tests distributions with something to measure."""
    with torch.no_grad():
        weight.mul_(factor)


def tiny_gpt2(
    vocab_size: int, *, hidden: int = STUDENT_HIDDEN, seed: int = 0, head_scale: float = 20.0
) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=hidden,
        n_layer=1,
        n_head=2,
        n_positions=128,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config).float()
    scale_head(model.lm_head.weight, head_scale)
    return model


def tiny_llama(
    vocab_size: int, *, hidden: int = TEACHER_HIDDEN, seed: int = 1, head_scale: float = 8.0
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).float()
    scale_head(model.lm_head.weight, head_scale)
    return model


def models(
    student_name: str = "gpt2",
    teacher_name: str = "tinyllama",
    *,
    student_scale: float = 20.0,
    teacher_scale: float = 8.0,
):
    """`(student, LocalTeacher)`; each model is a GPT-2 or a Llama by its tokenizer's family."""
    s_tok, t_tok = tokenizer(student_name), tokenizer(teacher_name)
    if student_name == "gpt2":
        student = tiny_gpt2(len(s_tok), head_scale=student_scale)
    else:
        student = tiny_llama(len(s_tok), hidden=STUDENT_HIDDEN, seed=0, head_scale=student_scale)
    if teacher_name == "gpt2":
        teacher = tiny_gpt2(len(t_tok), hidden=TEACHER_HIDDEN, seed=1, head_scale=teacher_scale)
    else:
        teacher = tiny_llama(len(t_tok), head_scale=teacher_scale)
    return student, LocalTeacher(teacher, t_tok)


def make_batch(aligner, student_name: str = "gpt2", teacher_name: str = "tinyllama", examples=EXAMPLES) -> Batch:
    """One micro-batch of `examples` as the data loader makes it: both tokenizations, labels, and the
    aligner's pairs turned into packed aligned rows."""
    s_tok, t_tok = tokenizer(student_name), tokenizer(teacher_name)
    rows = tokenize_split(list(examples), s_tok, t_tok, DataConfig(), aligner=aligner, split="valid")
    return collate(
        [rows[i] for i in range(len(rows))],
        student_pad_id=s_tok.eos_token_id,
        teacher_pad_id=t_tok.eos_token_id,
    )


def make_context(
    student,
    teacher,
    student_name: str = "gpt2",
    *,
    divergence,
    temperature: float = 1.0,
    chunk_size: int = 4,
    aligner=None,
    same_vocab: bool = False,
) -> ObjectiveContext:
    tok = tokenizer(student_name)
    return ObjectiveContext(
        student=student,
        student_tokenizer=tok,
        student_head=head_from_model(student, len(tok), name="student"),
        teacher=teacher,
        divergence=divergence,
        divergence_name=getattr(divergence, "__name__", "divergence"),
        temperature=temperature,
        chunk_size=chunk_size,
        aligner=aligner,
        same_vocab=same_vocab,
    )


def valid_outputs(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, b: int):
    """Sequence `b`'s last hidden states, the model's own logits and labels at its label positions, in order."""
    out = model(input_ids=ids[b : b + 1], attention_mask=mask[b : b + 1], output_hidden_states=True, use_cache=False)
    keep = labels[b] != -100
    return out.hidden_states[-1][0][keep], out.logits[0][keep], labels[b][keep]
