"""The eval stage of a job: the teacher, the untrained student and the distilled student, side by side.

Generation metrics (exact match and ROUGE-L on the configured split) for all three, and the teacher-forced
distillation metrics (top-1 agreement with the teacher, per-token KL to it) for the two students.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from dskd.config import Config
from dskd.data import chat
from dskd.data.batching import ResumableBatchSampler, collate
from dskd.data.examples import load_examples
from dskd.evaluation.scoring import generate_and_score, teacher_agreement
from dskd.kit import Aligner, member
from dskd.kit.objective import same_vocabulary
from dskd.models.loading import load_model, load_tokenizer
from dskd.run.components import build_aligner, build_student, build_teacher

GENERATION_KEYS = ("exact_match", "rougeL", "avg_new_tokens", "num_examples", "teacher_scaffolding")


def eval_examples(config: Config):
    e = config.eval
    path = config.data.test if e.split == "test" else config.data.valid
    examples = load_examples(path, config.data, e.split)
    return examples[: e.max_samples] if e.max_samples else examples


def generation_metrics(
    config: Config, model, tokenizer, *, side: str = "student", scaffolding: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Exact match and ROUGE-L of `model`'s answers on the evaluation split. Conversations: each model is prompted
    through its own chat template with the messages before the last assistant turn and the generation prompt, stops
    at its end-of-turn token, and is scored against that last assistant turn; with `scaffolding` (the teacher
    template's words, `dskd.data.chat.foreign_scaffolding`) also the share of answers that contain them."""
    e = config.eval
    examples = eval_examples(config)
    chat_kwargs: dict[str, Any] = {}
    if examples and examples[0].is_conversation:
        where = f"data.{e.split}"
        marker = chat.end_of_turn(tokenizer, examples[0].messages, side=side, where=f"{where}, sample 0")
        chat_kwargs = dict(
            prompt_ids=[
                chat.generation_prompt_ids(tokenizer, x.messages, side=side, where=f"{where}, sample {i}")
                for i, x in enumerate(examples)
            ],
            stop_ids=chat.end_of_turn_ids(tokenizer, marker),
            stop_text=marker,
            scaffolding=scaffolding,
        )
    scored = generate_and_score(
        model,
        tokenizer,
        [x.prompt for x in examples],
        [x.references for x in examples],
        max_new_tokens=e.max_new_tokens,
        batch_size=e.batch_size,
        temperature=e.temperature,
        top_p=e.top_p,
        seeds=list(e.seeds),
        max_prompt_length=0 if chat_kwargs else config.data.max_prompt_length,
        **chat_kwargs,
    )
    return {key: scored[key] for key in GENERATION_KEYS if key in scored}


def _held_out_batches(job, teacher, student_tokenizer, aligner, same_vocab: bool):
    config = job.config
    split = "valid" if config.data.valid else config.eval.split
    dataset = job.tokenized(split, student_tokenizer, teacher.tokenizer, None if same_vocab else aligner)
    size = min(config.eval.batch_size, len(dataset))
    sampler = ResumableBatchSampler(len(dataset), size, shuffle=False, drop_last=False, infinite=False)
    make = functools.partial(
        collate, student_pad_id=student_tokenizer.pad_token_id, teacher_pad_id=teacher.tokenizer.pad_token_id
    )
    for indices in sampler:
        yield make([dataset[i] for i in indices])


MODELS = ("teacher", "student_init", "student")


def evaluate_stage(
    job, teacher_path: Path | None, final: Path | None, *, include: tuple[str, ...] = MODELS
) -> dict[str, Any]:
    """Metrics of the models named in `include` (default: all three)."""
    config, device, console = job.config, job.device, job.console
    results: dict[str, Any] = {}
    teacher = build_teacher(
        config, device, model_path=str(teacher_path) if teacher_path else None, cache_dir=job.cache_dir
    )
    scaffolding = _teacher_scaffolding(config, teacher.tokenizer)
    if "teacher" not in include:
        pass
    elif hasattr(teacher, "model"):
        results["teacher"] = generation_metrics(
            config, teacher.model, teacher.tokenizer, side="teacher", scaffolding=scaffolding
        )
    elif "generate" in getattr(teacher, "capabilities", ()):
        # A remote teacher generates on its server (Generate): the same metrics as an in-process one.
        results["teacher"] = generation_metrics(
            config, teacher, teacher.tokenizer, side="teacher", scaffolding=scaffolding
        )
    else:
        console.print(
            "eval: the teacher does not offer Generate (a server without it, or a teacher store); its generation metrics are not measured"
        )
    init = build_student(config, device, fresh=True)
    same_vocab = same_vocabulary(teacher.tokenizer, init.tokenizer)
    # objective=None: teacher agreement is measured with the configured (else the exact, eta) alignment, not
    # the objective's own default, so the metric means the same thing for every objective (uld's index
    # alignment would pair unrelated tokens).
    aligner = agreement_aligner(job, teacher.tokenizer, init.tokenizer, same_vocab)
    token_map = None if same_vocab else aligner.vocab_map()
    students = {"student_init": (init.model, init.tokenizer)} if "student_init" in include else {}
    if final is not None and "student" in include:
        tokenizer = load_tokenizer(config.student.__class__(tokenizer=str(final), model=str(final)), "student")
        model = load_model(config.student.__class__(model=str(final), dtype=config.student.dtype), "student").to(device)
        students["student"] = (model, tokenizer)
    for name, (model, tokenizer) in students.items():
        metrics = generation_metrics(config, model, tokenizer, scaffolding=scaffolding)
        metrics.update(
            teacher_agreement(
                model,
                teacher,
                _held_out_batches(job, teacher, tokenizer, aligner, same_vocab),
                token_map=token_map,
                student_vocab_size=len(tokenizer),
            )
        )
        results[name] = metrics
    teacher.close()
    keys = ["exact_match", "rougeL", "teacher_agreement", "teacher_kl"]
    header = ["model", "exact match", "ROUGE-L", "agreement %", "KL to teacher"]
    if scaffolding:
        keys.append("teacher_scaffolding")
        header.append("teacher scaffolding %")  # its words ([INST]) are listed in the line below, not as markup
    rows = [[name] + [results[name].get(k, "-") for k in keys] for name in MODELS if name in results]
    console.table(f"results ({config.eval.split} split)", header, rows)
    if scaffolding:
        console.print(f"teacher scaffolding: answers containing any of {', '.join(scaffolding)}", markup=False)
    return results


def _teacher_scaffolding(config: Config, teacher_tokenizer) -> tuple[str, ...]:
    """Conversations: the teacher template's words the student's template never writes (none otherwise)."""
    examples = eval_examples(config)
    if not examples or not examples[0].is_conversation:
        return ()
    student_tokenizer = load_tokenizer(config.student, "student")
    return chat.foreign_scaffolding(
        teacher_tokenizer, student_tokenizer, examples[0].messages, f"data.{config.eval.split}, sample 0"
    )


def agreement_aligner(job, teacher_tokenizer, student_tokenizer, same_vocab: bool):
    """The aligner teacher agreement is measured with: the configured one (else the default across
    vocabularies), or the default one when the configured aligner has no teacher->student vocabulary map, which
    agreement needs to compare a teacher's top-1 with a student's."""
    aligner = build_aligner(job.config, job.registry, teacher_tokenizer, student_tokenizer, same_vocab, objective=None)
    if same_vocab or member(aligner, Aligner, "vocab_map")() is not None:
        return aligner
    fallback = job.registry.default("aligners")
    job.console.print(
        f"eval: aligner {job.config.aligner.name!r} has no vocabulary map; teacher agreement uses {fallback!r}"
    )
    return job.registry.get("aligners", fallback)(teacher_tokenizer, student_tokenizer)


def student_agreement(job, model, tokenizer) -> dict[str, float]:
    """Teacher agreement and KL of one student against the job's configured teacher, on held-out text."""
    config = job.config
    teacher = build_teacher(config, job.device, cache_dir=job.cache_dir)
    same_vocab = same_vocabulary(teacher.tokenizer, tokenizer)
    aligner = agreement_aligner(job, teacher.tokenizer, tokenizer, same_vocab)
    try:
        return teacher_agreement(
            model,
            teacher,
            _held_out_batches(job, teacher, tokenizer, aligner, same_vocab),
            token_map=None if same_vocab else aligner.vocab_map(),
            student_vocab_size=len(tokenizer),
        )
    finally:
        teacher.close()
