"""Tiny random-initialised Llama students and teachers, batches over them, and the plumbing that runs a
dual-space objective on them the way the engine does (student hidden states + a `LocalTeacher` signal).

Shared by the dual-space objective tests (`test_dual_space_*.py`, `test_objective_dskd*.py`). Models are
1-layer Llamas with hidden sizes 16 (student) and 24 (teacher). Two vocabularies:

- `tiny_tokenizer()`: a 61-token word-level tokenizer built in memory. Comparisons to 1e-5 in float32 use
  it: over a 32,000-token vocabulary the float32 sums inside a logit-gradient product already differ from
  the float64 truth by up to ~1e-5 of the gradient's scale (measured: 8.7e-6 with one-row chunks, 3.3e-6
  with 16-row chunks), so a 1e-5 test there would test BLAS blocking, not the loss.
- `tokenizer("tinyllama")`: the project's copy of the real TinyLlama tokenizer (32,000 tokens), for the
  tests where a real vocabulary matters (shared vocabulary, least squares at full size).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from objective_checks import assert_rel, run_objective  # noqa: F401  (re-exported for the tests)
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dskd.kit.lm_head import head_from_model
from dskd.kit.objective import ObjectiveContext
from dskd.models.teacher import LocalTeacher
from dskd.types import IGNORE_INDEX, Batch

TOKENIZERS = Path(__file__).resolve().parents[1] / "examples" / "tokenizers"
STUDENT_HIDDEN = 16
TEACHER_HIDDEN = 24
TINY_VOCAB = 61


@functools.lru_cache(maxsize=None)
def tokenizer(name: str = "tinyllama"):
    """The project's bundled copy of a real tokenizer (loaded once per test session)."""
    return AutoTokenizer.from_pretrained(TOKENIZERS / name)


@functools.lru_cache(maxsize=None)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A real (fast, word-level) tokenizer over 61 tokens: `<unk>`, `<s>`, `</s>`, `t3` ... `t60`."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, TINY_VOCAB)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_llama(hidden: int, seed: int, vocab_size: int) -> LlamaForCausalLM:
    """A 1-layer float32 Llama with an untied head (so the head's gradient is its own)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).float()


def tiny_student(vocab_size: int, *, seed: int = 0) -> LlamaForCausalLM:
    """A student whose head is scaled up: random-init logits are tiny (std ~0.1), which makes every softmax
    nearly uniform and every divergence nearly zero; logits of std ~4 give the tests something to measure."""
    student = tiny_llama(STUDENT_HIDDEN, seed, vocab_size)
    with torch.no_grad():
        student.lm_head.weight.mul_(50.0)
    return student


def related_teacher(student: LlamaForCausalLM, *, seed: int = 1, noise: float = 0.3) -> LlamaForCausalLM:
    """A teacher whose head is the student's head mapped into teacher space (`W_s R`) plus noise.

    With independent random heads the least-squares t2s projector never keeps the teacher's top-1, so the
    DSKDv2 agreement gate would drop every token; with this head it keeps some tokens and drops others,
    which is what the gate tests need to see.
    """
    teacher = tiny_llama(TEACHER_HIDDEN, seed, student.config.vocab_size)
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        mix = torch.randn(student.config.hidden_size, TEACHER_HIDDEN, generator=gen) / 4
        own = torch.randn(teacher.lm_head.weight.shape, generator=gen)
        teacher.lm_head.weight.copy_(student.lm_head.weight @ mix + noise * own)
    return teacher


def student_and_teacher(tok, *, seed: int = 0) -> tuple[LlamaForCausalLM, LocalTeacher]:
    student = tiny_student(len(tok), seed=seed)
    return student, LocalTeacher(related_teacher(student, seed=seed + 1), tok)


def make_batch(lengths: list[int], prompts: list[int], *, vocab_size: int = TINY_VOCAB, seed: int = 0) -> Batch:
    """Sequences of random ids, right-padded, the same ids for student and teacher (one shared tokenizer).

    Position p predicts token p + 1 (labels = next ids); the first `prompt` labels and the padding are
    ignored. Ids avoid 0-2 (unk, bos, eos) only to look like text; nothing depends on it.
    """
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.int64)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for b, (n, prompt) in enumerate(zip(lengths, prompts)):
        seq = torch.randint(3, vocab_size, (n,), generator=gen)
        ids[b, :n] = seq
        mask[b, :n] = 1
        labels[b, prompt : n - 1] = seq[prompt + 1 : n]
    return Batch(ids, mask, labels, ids.clone(), mask.clone(), labels.clone()).index_rows()


def split_batch(batch: Batch, index: int) -> Batch:
    """Sequence `index` alone, as its own micro-batch (trimmed to its own length)."""
    n = int(batch.student_attention_mask[index].sum())

    def take(t: torch.Tensor) -> torch.Tensor:
        return t[index : index + 1, :n].clone()

    student = (take(batch.student_input_ids), take(batch.student_attention_mask), take(batch.student_labels))
    teacher = (take(batch.teacher_input_ids), take(batch.teacher_attention_mask), take(batch.teacher_labels))
    return Batch(*student, *teacher).index_rows()


def make_context(
    student,
    teacher: LocalTeacher,
    *,
    divergence,
    temperature: float = 1.0,
    chunk_size: int = 5,
    same_vocab: bool = True,
    student_tokenizer=None,
    aligner=None,
) -> ObjectiveContext:
    tok = student_tokenizer if student_tokenizer is not None else teacher.tokenizer
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
