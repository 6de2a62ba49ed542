"""Jobs with several teachers (`[[teachers]]`, issue 18): building the teachers, their data and the composite
objective, asking every teacher for a micro-batch at once, and the two training stages.

`dskd.run.job.Job` hands its stages here when the config has `[[teachers]]`; a job with one `[teacher]` never
reaches this module. Each teacher is built exactly as the single teacher would be (`entry_config`: the job as if
that entry were its `[teacher]`), so local, remote and stored teachers, aligners and objectives need nothing new.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from dskd.config_teachers import TeacherEntry, entry_config, route_fields
from dskd.data.multi_teacher import MultiTeacherDataset, collate_teachers, serving_sets
from dskd.errors import DskdError
from dskd.kit import Objective, member
from dskd.kit.multi_teacher import MultiTeacherObjective
from dskd.kit.objective import same_vocabulary
from dskd.models.teacher import tokenizer_fingerprint
from dskd.run.checkpoint import require_finite
from dskd.run.components import (
    build_aligner,
    build_objective,
    build_policy,
    build_student,
    build_teacher,
    distils,
    policy_name,
)
from dskd.run.engine import StageSpec, Trainer
from dskd.run.teacher_set import TeacherSet

TEACHERS_DIR = "teachers"
"""run_dir/teachers/<name>/: a teacher fine-tuned by the teacher_sft stage."""


# -- data --------------------------------------------------------------------------------------------------------
def training_examples(job: Any) -> list:
    """The training split with the route fields as tags, and the serving teachers checked (one line each)."""
    cfg = job.config
    if cfg.data.streaming:
        raise DskdError(
            "data.streaming with [[teachers]]: several teachers read the training split in memory (each tokenises "
            "and aligns it once); set data.streaming = false or keep one teacher"
        )
    from dskd.data.examples import load_examples

    return load_examples(cfg.data.train, cfg.data, "train", tag_fields=route_fields(cfg))


def teacher_dataset(job: Any, examples: list, student_tokenizer: Any, pairs: list[tuple[TeacherEntry, Any, Any]]):
    """`MultiTeacherDataset` of the training split: each teacher's tokenised and aligned split (cached), by sample."""
    serving = serving_sets([entry for entry, _, _ in pairs], examples)
    splits = {}
    for entry, tokenizer, aligner in pairs:
        same = same_vocabulary(tokenizer, student_tokenizer)
        splits[entry.name] = job.tokenized(
            "train",
            student_tokenizer,
            tokenizer,
            None if same else aligner,
            examples,
            sides=("student", f"teachers.{entry.name}"),
        )
    return MultiTeacherDataset(splits, serving)


def make_batches(
    job: Any, dataset: MultiTeacherDataset, student_pad: int, pads: dict[str, int], weights, batch_size: int
):
    collate_fn = functools.partial(collate_teachers, student_pad_id=student_pad, teacher_pad_ids=pads, weights=weights)
    return job.batches(dataset, batch_size, student_pad, 0, collate_fn=collate_fn)


# -- stages ------------------------------------------------------------------------------------------------------
def trainable_here(entry: TeacherEntry) -> bool:
    """An entry the teacher_sft stage fine-tunes: built from a model config in this process (random init)."""
    t = entry.teacher
    return bool(t.config) and not (t.model or t.address or t.store)


def teacher_sft(job: Any) -> dict[str, Path]:
    """Fine-tune every trainable entry on the samples routed to it; `{name: folder}` of the fine-tuned teachers."""
    cfg = job.config
    examples = training_examples(job)
    entries = [e for e in cfg.teachers if trainable_here(e)]
    serving = serving_sets(list(cfg.teachers), examples)
    out = {}
    for entry in entries:
        target = job.run_dir / TEACHERS_DIR / entry.name
        out[entry.name] = target
        if (target / "config.json").exists():
            job.console.print(f"teacher_sft: reusing the trained teacher {entry.name!r} in {target}")
            continue
        own = [example for example, names in zip(examples, serving) if entry.name in names]
        job.console.print(f"teacher_sft: teacher {entry.name!r} on {len(own)} of {len(examples)} samples")
        job.teacher_sft(config=entry_config(cfg, entry), examples=own, target=target, stage=f"teacher_sft-{entry.name}")
    return out


def distill(job: Any, teacher_paths: dict[str, Path]) -> Path:
    """The distillation stage with every teacher of the job (`MultiTeacherObjective`)."""
    cfg = job.config
    examples = training_examples(job)
    serving_sets(list(cfg.teachers), examples)  # routes checked before any model loads
    student = build_student(cfg, job.device)
    teachers, members, pairs, fingerprints = {}, {}, [], {}
    for entry in cfg.teachers:
        config = entry_config(cfg, entry)
        path = teacher_paths.get(entry.name)
        try:
            teacher = build_teacher(config, job.device, model_path=str(path) if path else None, cache_dir=job.cache_dir)
        except DskdError as error:
            raise type(error)(f"teachers.{entry.name}: {error}") from None
        same_vocab = same_vocabulary(teacher.tokenizer, student.tokenizer)
        aligner = build_aligner(
            config, job.registry, teacher.tokenizer, student.tokenizer, same_vocab, objective=cfg.objective.name
        )
        objective, ce_terms = build_objective(config, job.registry, student, teacher, aligner)
        teachers[entry.name], members[entry.name] = teacher, objective
        pairs.append((entry, teacher.tokenizer, aligner))
        fingerprints[f"teacher/{entry.name}"] = teacher.fingerprint
        fingerprints[f"teacher_tokenizer/{entry.name}"] = tokenizer_fingerprint(teacher.tokenizer)
        job.console.print(
            f"distill: teacher {entry.name!r} (weight {entry.weight:g}"
            + (f", route {entry.route_field} = {', '.join(entry.route_values)}" if entry.route else "")
            + f"): {'same vocabulary' if same_vocab else getattr(aligner, 'label', type(aligner).__name__)}, "
            f"fingerprint {teacher.fingerprint[:12]}"
        )
    objective = MultiTeacherObjective(members, ce_terms)
    description = member(objective, Objective, "describe")()
    if description:
        job.console.print(f"distill: {cfg.objective.name}: {description}")
    first = cfg.teachers[0].name
    policy = build_policy(
        cfg, job.registry, student, teachers[first], pairs[0][2], cache_dir=job.cache_dir,
        prompts=tuple(e.prompt for e in examples), objective=objective,
    )  # fmt: skip
    dataset = teacher_dataset(job, examples, student.tokenizer, pairs)
    for name, mismatches in dataset.text_differs.items():
        if mismatches:
            job.console.warn(
                f"data.train: for teacher {name!r}, in {mismatches} of {len(dataset)} samples the two tokenizers disagree "
                f"about the text; the aligner pairs around each difference"
            )
    pads = {entry.name: tokenizer.pad_token_id for entry, tokenizer, _ in pairs}
    weights = {entry.name: entry.weight for entry in cfg.teachers}
    spec = StageSpec(
        "distill",
        student.model,
        objective,
        policy,
        TeacherSet(teachers),
        make_batches(job, dataset, student.tokenizer.pad_token_id, pads, weights, cfg.train.batch_size),
        cfg.train,
        job.run_dir,
        cfg.run.log_every,
        {"student_tokenizer": tokenizer_fingerprint(student.tokenizer), **fingerprints},
        kd_rate=cfg.objective.kd_rate if distils(job.registry, cfg.objective.name) else 0.0,
        ce_terms=ce_terms,
        data_metrics={f"data/normalisation_mismatches/{n}": float(m) for n, m in dataset.text_differs.items()},
    )
    job.console.print(
        f"distill: objective {cfg.objective.name}, policy {policy_name(cfg, job.registry)}, {len(teachers)} teachers"
    )
    trained = Trainer.for_stage(spec, job.accelerator, job.console).run(resume=job.resume, force=job.force_resume)
    final = job.run_dir / "final"
    require_finite(trained, None, f"distilled student in {final}")
    job._save_model(trained, student.tokenizer, final)
    TeacherSet(teachers).close()
    return final
