"""An objective of a job, computed on one fixed batch outside the engine.

Researchers compare methods on fixed batches: the same texts, each objective's terms. This builds what a run
builds (student, teacher, aligner, objective) from a job's config, tokenises and aligns the given samples
exactly as the data loader does, runs the student and asks the teacher, and returns the loss the engine would
back-propagate for that batch taken alone, with the objective's unweighted terms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dskd.types import Batch, LossTerms


@dataclass
class BatchLoss:
    """`loss` (differentiable: weighted by the job's `kd_rate` over the batch's own valid student tokens),
    the objective's `terms`, the `batch` it was computed on, and the `objective` (its projectors, if any)."""

    loss: torch.Tensor
    terms: LossTerms
    batch: Batch
    objective: Any


def loss_terms_on_batch(
    config: Any,
    samples: Sequence[tuple[str, str]] | None = None,
    *,
    registry: Any = None,
    student: Any = None,
    objective: str | None = None,
    device: str | torch.device = "cpu",
) -> BatchLoss:
    """The loss and terms of the job's objective (or `objective`) on one batch.

    `config` is a job's `Config` or the path of its TOML file. `samples` are `(prompt, response)` texts; by
    default the first `train.batch_size` samples of the training split. `student` is a `Student` (model and
    tokenizer) to evaluate instead of the job's, e.g. a checkpoint. The teacher is the job's (a trained local
    teacher, or a remote one). Projectors start as the objective builds them at step 0.
    """
    # Local imports: the run machinery sits above the kit in the package's layers.
    from dskd.config import load_config
    from dskd.data.batching import collate
    from dskd.data.examples import Example, load_examples, tokenize_split
    from dskd.kit.lm_head import last_hidden_state
    from dskd.kit.objective import same_vocabulary
    from dskd.kit.weights import objective_loss
    from dskd.registry import load_registry
    from dskd.run.components import build_aligner, build_objective, build_student, build_teacher, distils

    registry = registry if registry is not None else load_registry()
    if not hasattr(config, "objective"):
        config = load_config(config, registry=registry)
    name = objective or config.objective.name
    device = torch.device(device)
    student = student if student is not None else build_student(config, device)
    teacher = build_teacher(config, device) if registry.declared("objectives", name, "needs_teacher") else None
    same_vocab = teacher is None or same_vocabulary(teacher.tokenizer, student.tokenizer)
    aligner = None
    if teacher is not None:
        aligner = build_aligner(config, registry, teacher.tokenizer, student.tokenizer, same_vocab, objective=name)
    built, _ = build_objective(config, registry, student, teacher, aligner, name=name)
    if samples is None:
        examples = load_examples(config.data.train, config.data, "train")[: config.train.batch_size]
    else:
        examples = [Example(prompt=prompt, references=(response,)) for prompt, response in samples]
    teacher_tokenizer = None if teacher is None else teacher.tokenizer
    rows = tokenize_split(
        examples, student.tokenizer, teacher_tokenizer, config.data, aligner=None if same_vocab else aligner
    )
    pad_t = student.tokenizer.pad_token_id if teacher is None else teacher.tokenizer.pad_token_id
    batch = collate(list(rows), student_pad_id=student.tokenizer.pad_token_id, teacher_pad_id=pad_t).to(device)
    hidden = last_hidden_state(student.model, batch.student_input_ids, batch.student_attention_mask)
    signal = None
    if teacher is not None and not built.request.empty:
        signal = teacher.score(batch.teacher_input_ids, batch.teacher_attention_mask, batch.teacher_rows, built.request)
    kd_rate = config.objective.kd_rate if distils(registry, name) else 0.0
    loss, terms = objective_loss(built, batch, hidden, signal, kd_rate=kd_rate)
    if teacher is not None:
        teacher.close()
    return BatchLoss(loss, terms, batch, built)
