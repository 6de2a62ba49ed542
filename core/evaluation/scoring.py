"""Evaluation: generation scored by ROUGE-L and exact match, and two teacher-forced distillation metrics.

- `generate_and_score` answers held-out prompts with the student (or the teacher) and scores the answers
  against the reference responses (spec §12), averaged over generation seeds.
- `teacher_agreement` measures how closely the student already follows its teacher on held-out text:
  the share of positions where both predict the same next token, and the mean per-token forward
  KL(teacher || student). Neither is reported by the reference code or by the peer frameworks; both measure
  what distillation optimises directly, where ROUGE-L measures it only through sampled text.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

import torch

from dskd.config import DataConfig
from dskd.data.examples import encode_prompt
from dskd.errors import DataError, DskdError
from dskd.evaluation.metrics import References, score_examples
from dskd.kit.lm_head import head_from_model, last_hidden_state
from dskd.models.generation import sample_continuations
from dskd.types import Batch, SignalRequest


def _encode_prompt(tokenizer, prompt: str, max_prompt_length: int = 0) -> list[int]:
    """Prompt ids exactly as training encodes prompts (`dskd.data.examples.encode_prompt`): BOS where the tokenizer adds
    one, the text with special-token strings kept as data, and the last `max_prompt_length` ids (0: all)."""
    return encode_prompt(tokenizer, prompt, DataConfig(max_prompt_length=max_prompt_length or sys.maxsize))


def _check_context(model, prompts: list[list[int]], max_new_tokens: int) -> None:
    if isinstance(model, torch.nn.Module):
        context = getattr(model.config, "max_position_embeddings", None)
    else:  # a remote teacher: the longest sequence its server accepts
        context = getattr(getattr(model, "limits", None), "max_seq_len", None)
    longest = max(len(p) for p in prompts)
    if context and longest + max_new_tokens > context:
        raise DskdError(
            f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's context of "
            f"{context} tokens; lower eval.max_new_tokens or data.max_prompt_length"
        )


def generate_and_score(
    model,
    tokenizer,
    prompts: list[str],
    references: list[References],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seeds: Sequence[int] = (0,),
    max_prompt_length: int = 0,
    prompt_ids: list[list[int]] | None = None,
    stop_ids: Sequence[int] = (),
    stop_text: str = "",
    scaffolding: Sequence[str] = (),
) -> dict:
    """Generate an answer to every prompt, once per seed, and score it against its references.

    `model` is a causal LM, or a teacher (`dskd.models.teacher.Teacher`, e.g. a remote one) that generates itself.

    Answers are decoded with `skip_special_tokens=True` and stripped. Returns the means over seeds of
    `exact_match` and `rougeL` (0-100) and `avg_new_tokens` (generated tokens per prompt, the stopping EOS
    included), plus `num_examples`, `seeds`, `per_seed` (each seed's own figures), `per_example` (each example's
    `exact_match` and `rougeL`, means over seeds) and `predictions` (the answers of the first seed, for the caller
    to save). Greedy decoding (`temperature == 0`) ignores the
    seed, so it generates once and reuses the answers for every seed.

    Conversations: `prompt_ids` are the prompts already rendered by the model's chat template and tokenised (used
    instead of `prompts`), generation stops at `stop_ids` (the template's end-of-turn token) and each answer is cut
    at `stop_text` (an end-of-turn marker of several tokens). With `scaffolding` (the teacher template's words),
    `teacher_scaffolding` is the percentage of answers that contain any of them.
    """
    seeds = [int(s) for s in seeds]
    if len(prompts) != len(references):
        raise DskdError(
            f"got {len(prompts)} prompts but {len(references)} reference lists; give one reference list per prompt"
        )
    if not prompts:
        raise DskdError("no prompts to evaluate; check the evaluation split and eval.max_samples")
    if not seeds:
        raise DskdError("eval.seeds is empty; give at least one generation seed, e.g. seeds = [0]")
    if max_new_tokens < 1 or batch_size < 1:
        raise DskdError(f"max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be at least 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise DskdError(f"temperature must be >= 0 (got {temperature}) and top_p in (0, 1] (got {top_p})")

    if prompt_ids is not None:
        encoded = [list(ids)[-max_prompt_length:] if max_prompt_length else list(ids) for ids in prompt_ids]
    else:
        encoded = [_encode_prompt(tokenizer, p, max_prompt_length) for p in prompts]
    _check_context(model, encoded, max_new_tokens)

    per_seed: list[dict] = []
    per_example: list[list[dict[str, float]]] = []
    predictions: list[str] | None = None
    greedy_rows: list[list[int]] | None = None
    for seed in seeds:
        if temperature == 0 and greedy_rows is not None:
            rows = greedy_rows
        else:
            if isinstance(model, torch.nn.Module):
                rows = sample_continuations(
                    model, tokenizer, encoded,
                    max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
                    stop_ids=stop_ids,
                )  # fmt: skip
            else:  # a remote teacher generates on its server, in requests it sizes to the server's limits
                rows = model.generate(
                    encoded, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
                )
            greedy_rows = rows if temperature == 0 else None
        texts = [tokenizer.decode(row, skip_special_tokens=True) for row in rows]
        if stop_text:
            texts = [text.split(stop_text)[0] for text in texts]
        texts = [text.strip() for text in texts]
        if predictions is None:
            predictions = texts
        scores = score_examples(texts, references)
        per_example.append(scores)
        corpus = {key: sum(x[key] for x in scores) / len(scores) for key in ("exact_match", "rougeL")}
        per_seed.append({"seed": seed, **corpus, "avg_new_tokens": sum(len(r) for r in rows) / len(rows)})

    def mean(key: str) -> float:
        return sum(s[key] for s in per_seed) / len(per_seed)

    extra = {}
    if scaffolding:
        extra["teacher_scaffolding"] = 100.0 * sum(any(w in t for w in scaffolding) for t in predictions) / len(prompts)
    return {
        **extra,
        "exact_match": mean("exact_match"),
        "rougeL": mean("rougeL"),
        "avg_new_tokens": mean("avg_new_tokens"),
        "num_examples": len(prompts),
        "seeds": seeds,
        "per_seed": per_seed,
        "predictions": predictions,
        "per_example": [
            {key: sum(scores[i][key] for scores in per_example) / len(per_example) for key in ("exact_match", "rougeL")}
            for i in range(len(prompts))
        ],
    }


@torch.inference_mode()
def teacher_agreement(
    student: torch.nn.Module,
    teacher,
    batches: Iterable[Batch],
    *,
    token_map: torch.Tensor | None = None,
    student_vocab_size: int | None = None,
    chunk_rows: int = 256,
) -> dict[str, float]:
    """Teacher-forced agreement of `student` with `teacher` (a `dskd.models.teacher.Teacher`) on held-out `batches`.

    Returns `teacher_agreement`, the percentage (0-100) of compared positions where the student's argmax
    equals the teacher's, and `teacher_kl`, the mean per-position KL(teacher || student) in nats.

    Which positions are compared:

    - same vocabulary (`token_map is None`): every valid label position; the student's and the teacher's
      valid labels must be the same tokens.
    - different vocabularies: the aligned rows (`batch.aligned_rows`). `token_map` is a `(V_teacher,)`
      LongTensor giving each teacher id's student id, or -1 when the student has no such token. The
      teacher's argmax is mapped through it; a teacher argmax that maps to -1 counts as a disagreement.
      The two distributions live on different vocabularies, so the KL is taken on their overlap: the
      teacher's probabilities of the mapped ids are renormalised and carried to their student ids (summed
      if several teacher ids share one), the student's distribution is renormalised over those student ids,
      and KL is computed between the two. With an identity map this is the ordinary KL.

    `student_vocab_size` is the student tokenizer's size (default: the teacher's for the same vocabulary, the
    student head's rows otherwise; pass `len(tokenizer)` when the head is padded). Logits are computed
    `chunk_rows` positions at a time, so no `(tokens x vocabulary)` tensor for all positions is ever held.
    """
    same_vocab = token_map is None
    device = next(student.parameters()).device
    if same_vocab:
        vocab_size = student_vocab_size or teacher.vocab_size
    else:
        vocab_size = student_vocab_size or int(student.get_output_embeddings().weight.shape[0])
    student_head = head_from_model(student, vocab_size, name="student")
    overlap = None if same_vocab else _vocab_overlap(token_map, teacher.vocab_size, vocab_size, device)
    if not same_vocab:
        token_map = token_map.to(device)

    agree = torch.zeros((), dtype=torch.float64, device=device)
    kl = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    was_training = student.training
    student.eval()
    try:
        for batch in batches:
            teacher_hidden, student_hidden, pairs = _paired_hidden_states(student, teacher, batch, same_vocab, device)
            count += int(pairs.shape[0])
            for start in range(0, pairs.shape[0], max(1, chunk_rows)):
                chunk = pairs[start : start + chunk_rows]
                t_hidden = teacher_hidden.index_select(0, chunk[:, 0].to(teacher_hidden.device))
                t_logits = teacher.head.logits(t_hidden.to(teacher.head.weight.device)).to(device)
                s_logits = student_head.logits(student_hidden.index_select(0, chunk[:, 1]))
                s_top = s_logits.argmax(-1)
                if same_vocab:
                    agree += (t_logits.argmax(-1) == s_top).sum()
                    t_logprobs = torch.log_softmax(t_logits, -1)
                    kl += (t_logprobs.exp() * (t_logprobs - torch.log_softmax(s_logits, -1))).sum().double()
                else:
                    teacher_ids, student_ids, slot = overlap
                    agree += (token_map[t_logits.argmax(-1)] == s_top).sum()  # -1 never equals an argmax
                    # The teacher's renormalised mass on the overlap, carried onto the student ids it maps to.
                    t_probs = torch.softmax(t_logits.index_select(1, teacher_ids), -1)
                    p = torch.zeros(t_probs.shape[0], student_ids.shape[0], device=device).index_add_(1, slot, t_probs)
                    s_logprobs = torch.log_softmax(s_logits.index_select(1, student_ids), -1)
                    kl += (torch.xlogy(p, p) - p * s_logprobs).sum().double()
    finally:
        student.train(was_training)
    if count == 0:
        what = "valid label positions" if same_vocab else "aligned positions"
        raise DataError(
            f"the held-out batches have no {what} to compare student and teacher on; check the evaluation data"
        )
    return {"teacher_agreement": 100.0 * float(agree) / count, "teacher_kl": float(kl) / count}


def _vocab_overlap(token_map: torch.Tensor, teacher_vocab: int, student_vocab: int, device: torch.device):
    """`(teacher_ids, student_ids, slot)`: the mapped teacher ids, the distinct student ids they map to, and
    for each mapped teacher id the index of its student id in `student_ids`."""
    if token_map.dim() != 1 or token_map.shape[0] != teacher_vocab or token_map.dtype != torch.int64:
        raise DskdError(
            f"token_map must be a 1-D int64 tensor with one entry per teacher token ({teacher_vocab}), got "
            f"{token_map.dtype} of shape {tuple(token_map.shape)}; build it from the aligner's vocabulary map"
        )
    token_map = token_map.to(device)
    if bool((token_map >= student_vocab).any()) or bool((token_map < -1).any()):
        raise DskdError(
            f"token_map holds ids outside [-1, {student_vocab}); it must map teacher ids to student ids or -1"
        )
    teacher_ids = torch.nonzero(token_map >= 0).reshape(-1)
    if teacher_ids.numel() == 0:
        raise DskdError(
            "token_map maps no teacher token to a student token, so the vocabularies share nothing to compare"
        )
    student_ids, slot = torch.unique(token_map[teacher_ids], return_inverse=True)
    return teacher_ids, student_ids, slot


def _paired_hidden_states(student, teacher, batch: Batch, same_vocab: bool, device: torch.device):
    """Teacher and student last hidden states at their valid rows, and the `(P, 2)` pairs of rows to compare."""
    if batch.student_rows is None or batch.teacher_rows is None or (not same_vocab and batch.aligned_rows is None):
        if not same_vocab and batch.alignment is None:
            raise DataError(
                "a held-out batch has no alignment, but the vocabularies differ; build batches with the run's aligner"
            )
        batch.index_rows()
    signal = teacher.score(
        batch.teacher_input_ids, batch.teacher_attention_mask, batch.teacher_rows, SignalRequest(hidden_states=True)
    )
    hidden = last_hidden_state(student, batch.student_input_ids.to(device), batch.student_attention_mask.to(device))
    student_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.student_rows.to(device))
    if not same_vocab:
        return signal.hidden_states, student_hidden, batch.aligned_rows.to(device)
    n_student, n_teacher = int(batch.student_rows.numel()), int(batch.teacher_rows.numel())
    same_labels = n_student == n_teacher and torch.equal(
        batch.student_labels.reshape(-1).cpu()[batch.student_rows.cpu()],
        batch.teacher_labels.reshape(-1).cpu()[batch.teacher_rows.cpu()],
    )
    if not same_labels:
        raise DataError(
            "student and teacher labels differ on a held-out batch, so the vocabularies are not the same; "
            "pass the aligner's token_map to compare them through the alignment"
        )
    rows = torch.arange(n_student, device=device)
    return signal.hidden_states, student_hidden, torch.stack([rows, rows], dim=1)
