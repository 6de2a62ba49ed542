"""The eval stage of a job: the teachers, the untrained student and the distilled student, side by side.

Generation metrics (exact match and ROUGE-L on the configured split) for every model, and the teacher-forced
distillation metrics (top-1 agreement with the teacher, per-token KL to it) of the two students against each
teacher.

With one teacher the results are `{"teacher": {...}, "student_init": {...}, "student": {...}}` and each student
has `teacher_agreement` and `teacher_kl`. With several (`[[teachers]]`), each teacher is a row `teacher/<name>`,
measured on the evaluation samples it serves (its route; all samples without one), and each student has
`teacher_agreement/<name>` and `teacher_kl/<name>`: its agreement with that teacher on the held-out samples that
teacher serves, aligned with that teacher's aligner, which is what the student was trained to match. A routed
teacher also gets `exact_match/<name>` and `rougeL/<name>` on each student: the student's scores on that teacher's
samples, from the same answers as its overall scores, so they compare with the teacher's row.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dskd.config import Config
from dskd.config_teachers import TeacherEntry, entry_config, route_fields, teacher_entries
from dskd.data import chat
from dskd.data.batching import ResumableBatchSampler, collate
from dskd.data.examples import load_examples
from dskd.errors import DskdError
from dskd.evaluation.scoring import generate_and_score, teacher_agreement
from dskd.kit import Aligner, member
from dskd.kit.objective import same_vocabulary
from dskd.models.loading import load_model, load_tokenizer
from dskd.run.components import build_aligner, build_student, build_teacher
from dskd.run.teachers import TEACHERS_DIR

GENERATION_KEYS = ("exact_match", "rougeL", "avg_new_tokens", "num_examples", "teacher_scaffolding")
SCORE_KEYS = ("exact_match", "rougeL")


def eval_examples(config: Config):
    """The evaluation split (its first eval.max_samples), with the fields teachers are routed by as tags."""
    e = config.eval
    path = config.data.test if e.split == "test" else config.data.valid
    examples = load_examples(path, config.data, e.split, tag_fields=route_fields(config))
    return examples[: e.max_samples] if e.max_samples else examples


def generation_metrics(
    config: Config,
    model,
    tokenizer,
    *,
    side: str = "student",
    scaffolding: tuple[str, ...] = (),
    examples=None,
    per_example: bool = False,
) -> dict[str, Any]:
    """Exact match and ROUGE-L of `model`'s answers on the evaluation split (or on `examples`, a part of it).
    Conversations: each model is prompted through its own chat template with the messages before the last
    assistant turn and the generation prompt, stops at its end-of-turn token, and is scored against that last
    assistant turn; with `scaffolding` (the teacher template's words, `dskd.data.chat.foreign_scaffolding`) also the
    share of answers that contain them. `per_example`: also each example's scores (means over seeds)."""
    e = config.eval
    examples = eval_examples(config) if examples is None else examples
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
    keys = GENERATION_KEYS + (("per_example",) if per_example else ())
    return {key: scored[key] for key in keys if key in scored}


def held_out_split(config: Config) -> str:
    return "valid" if config.data.valid else config.eval.split


def held_out_examples(config: Config, entry: TeacherEntry | None = None) -> list:
    """The held-out samples agreement is measured on: those `entry` serves (all without a route)."""
    split = held_out_split(config)
    examples = load_examples(getattr(config.data, split), config.data, split, tag_fields=route_fields(config))
    return served_examples(entry, examples) if entry is not None else examples


def _held_out_batches(job, teacher, student_tokenizer, aligner, same_vocab: bool, examples: list):
    config = job.config
    split = held_out_split(config)
    dataset = job.tokenized(split, student_tokenizer, teacher.tokenizer, None if same_vocab else aligner, examples)
    size = min(config.eval.batch_size, len(dataset))
    sampler = ResumableBatchSampler(len(dataset), size, shuffle=False, drop_last=False, infinite=False)
    make = functools.partial(
        collate, student_pad_id=student_tokenizer.pad_token_id, teacher_pad_id=teacher.tokenizer.pad_token_id
    )
    for indices in sampler:
        yield make([dataset[i] for i in indices])


def served_examples(entry: TeacherEntry, examples) -> list:
    """The examples `entry` serves (all of them without a route)."""
    return [x for x in examples if entry.serves(dict(x.tags))]


def _none_served(console, entry: TeacherEntry, where: str, what: str) -> None:
    # Warned, not raised: the eval stage runs after training, and the other teachers' numbers still hold.
    console.warn(
        f"{where} has no sample that teacher {entry.name!r} serves (route {entry.route}), so its {what} is not "
        f"measured; evaluate on a split with such samples, or raise eval.max_samples"
    )


MODELS = ("teacher", "student_init", "student")


@dataclass(frozen=True)
class EvalTeacher:
    """One teacher as the evaluation sees it: its entry, the job as if it were the job's one teacher, the folder of
    its weights when they are not the configured ones (a fine-tuned copy, or `dskd eval --teacher`), and the suffix
    of its result keys ("" for a job's only teacher, "/<name>" for one of several)."""

    entry: TeacherEntry
    config: Config
    path: Path | None
    suffix: str

    @property
    def row(self) -> str:
        return "teacher" + self.suffix

    def build(self, job):
        return build_teacher(
            self.config, job.device, model_path=str(self.path) if self.path else None, cache_dir=job.cache_dir
        )


def eval_teachers(job, teacher_path: Path | Mapping[str, Path] | None) -> list[EvalTeacher]:
    """The job's teachers with the folders to load them from. `teacher_path` is the fine-tuned teacher of a job
    with one teacher, or a mapping of teacher names to folders; a trainable entry without one uses the copy the
    teacher_sft stage saved in the run directory (`teachers/<name>/`), if there is one."""
    entries = teacher_entries(job.config)
    several = len(entries) > 1
    # A job with several teachers records the folders its teacher_sft stage trained (`Job.teacher_paths`).
    paths = dict(teacher_path) if isinstance(teacher_path, Mapping) else dict(getattr(job, "teacher_paths", {}) or {})
    out = []
    for entry in entries:
        if isinstance(teacher_path, (str, Path)) and not several:
            path = Path(teacher_path)
        else:
            path = paths.get(entry.name) or _saved_copy(job, entry)
        out.append(EvalTeacher(entry, entry_config(job.config, entry), path, f"/{entry.name}" if several else ""))
    return out


def _saved_copy(job, entry: TeacherEntry) -> Path | None:
    t = entry.teacher
    if t.model or t.address or t.store:  # used as configured
        return None
    # [[teachers]] entries are saved by name (even a lone one); a [teacher] table in teacher/.
    folder = job.run_dir / (Path(TEACHERS_DIR, entry.name) if job.config.teachers else Path("teacher"))
    return folder if (folder / "config.json").is_file() else None


def evaluate_stage(
    job, teacher_path: Path | Mapping[str, Path] | None, final: Path | None, *, include: tuple[str, ...] = MODELS
) -> dict[str, Any]:
    """Metrics of the models named in `include` (default: all of them); `teacher_path` as in `eval_teachers`."""
    config, device, console = job.config, job.device, job.console
    results: dict[str, Any] = {}
    teachers = eval_teachers(job, teacher_path)
    several = len(teachers) > 1
    students: dict[str, tuple[Any, Any]] = {}
    init = build_student(config, device, fresh=True)
    if "student_init" in include:
        students["student_init"] = (init.model, init.tokenizer)
    if final is not None and "student" in include:
        tokenizer = load_tokenizer(config.student.__class__(tokenizer=str(final), model=str(final)), "student")
        model = load_model(config.student.__class__(model=str(final), dtype=config.student.dtype), "student").to(device)
        students["student"] = (model, tokenizer)
    examples = eval_examples(config) if several else None
    scaffolding: dict[str, tuple[str, ...]] = {}
    for t in teachers:
        teacher = t.build(job)
        try:
            scaffolding[t.row] = _teacher_scaffolding(config, teacher.tokenizer)
            served = served_examples(t.entry, examples) if several else None
            if "teacher" in include and served == []:
                _none_served(console, t.entry, f"data.{config.eval.split}", "generation")
            elif "teacher" in include:
                metrics = _teacher_generation(config, teacher, scaffolding[t.row], served, console, t.entry.name)
                if metrics is not None:
                    results[t.row] = metrics
            for name, (model, tokenizer) in students.items():
                results.setdefault(name, {}).update(
                    {f"{k}{t.suffix}": v for k, v in _agreement(job, t, teacher, model, tokenizer).items()}
                )
        finally:
            teacher.close()
    # One set of answers per student: scored overall and, per routed teacher, on that teacher's samples.
    words = tuple(dict.fromkeys(w for ws in scaffolding.values() for w in ws))
    for name, (model, tokenizer) in students.items():
        metrics = generation_metrics(config, model, tokenizer, scaffolding=words, per_example=several)
        per_example = metrics.pop("per_example", None)
        for t in teachers if several and per_example else ():
            served = [i for i, x in enumerate(examples) if t.entry.serves(dict(x.tags))]
            if t.entry.route and served:
                for key in SCORE_KEYS:
                    metrics[f"{key}{t.suffix}"] = sum(per_example[i][key] for i in served) / len(served)
        results[name] = {**metrics, **results.get(name, {})}
    _print_table(console, config, teachers, results, words)
    return {**{k: results[k] for k in results if k.startswith("teacher")}, **{k: results[k] for k in students}}


def _teacher_generation(config: Config, teacher, scaffolding, examples, console, name: str) -> dict[str, Any] | None:
    if hasattr(teacher, "model"):
        return generation_metrics(
            config, teacher.model, teacher.tokenizer, side="teacher", scaffolding=scaffolding, examples=examples
        )
    if "generate" in getattr(teacher, "capabilities", ()):
        # A remote teacher generates on its server (Generate): the same metrics as an in-process one.
        return generation_metrics(
            config, teacher, teacher.tokenizer, side="teacher", scaffolding=scaffolding, examples=examples
        )
    which = "the teacher" if name == "teacher" else f"teacher {name!r}"
    console.print(
        f"eval: {which} does not offer Generate (a server without it, or a teacher store); its generation metrics are not measured"
    )
    return None


def _agreement(job, t: EvalTeacher, teacher, model, tokenizer) -> dict[str, float]:
    """A student's top-1 agreement with one teacher and KL to it, on the held-out samples that teacher serves."""
    same_vocab = same_vocabulary(teacher.tokenizer, tokenizer)
    # objective=None: teacher agreement is measured with the configured (else the exact, eta) alignment, not
    # the objective's own default, so the metric means the same thing for every objective (uld's index
    # alignment would pair unrelated tokens).
    examples = held_out_examples(job.config, t.entry)
    if not examples:
        _none_served(job.console, t.entry, f"data.{held_out_split(job.config)}", "agreement")
        return {}
    aligner = agreement_aligner(job, teacher.tokenizer, tokenizer, same_vocab, config=t.config)
    return teacher_agreement(
        model,
        teacher,
        _held_out_batches(job, teacher, tokenizer, aligner, same_vocab, examples),
        token_map=None if same_vocab else aligner.vocab_map(),
        student_vocab_size=len(tokenizer),
    )


def _print_table(console, config: Config, teachers: list[EvalTeacher], results: dict, scaffolding) -> None:
    keys = ["exact_match", "rougeL"]
    header = ["model", "exact match", "ROUGE-L"]
    for t in teachers:
        keys += [f"teacher_agreement{t.suffix}", f"teacher_kl{t.suffix}"]
        to = f" ({t.entry.name})" if t.suffix else ""
        header += [f"agreement %{to}", f"KL to teacher{to}"]
    if scaffolding:
        keys.append("teacher_scaffolding")
        header.append("teacher scaffolding %")  # its words ([INST]) are listed in the line below, not as markup
    names = [t.row for t in teachers] + ["student_init", "student"]
    rows = [[name] + [results[name].get(k, "-") for k in keys] for name in names if name in results]
    console.table(f"results ({config.eval.split} split)", header, rows)
    routed = [t for t in teachers if t.suffix and t.entry.route]
    if routed:
        console.print(
            "teacher rows are measured on the samples each teacher serves: "
            + ", ".join(f"{t.entry.name} {results.get(t.row, {}).get('num_examples', '-')}" for t in routed),
            markup=False,
        )
    if scaffolding:
        console.print(f"teacher scaffolding: answers containing any of {', '.join(scaffolding)}", markup=False)


def _teacher_scaffolding(config: Config, teacher_tokenizer) -> tuple[str, ...]:
    """Conversations: the teacher template's words the student's template never writes (none otherwise)."""
    examples = eval_examples(config)
    if not examples or not examples[0].is_conversation:
        return ()
    student_tokenizer = load_tokenizer(config.student, "student")
    return chat.foreign_scaffolding(
        teacher_tokenizer, student_tokenizer, examples[0].messages, f"data.{config.eval.split}, sample 0"
    )


def agreement_aligner(job, teacher_tokenizer, student_tokenizer, same_vocab: bool, *, config: Config | None = None):
    """The aligner teacher agreement is measured with: the configured one (`config`'s, default the job's; a
    teacher's entry config carries its own), else the default across vocabularies, or the default one when the
    configured aligner has no teacher->student vocabulary map, which agreement needs to compare a teacher's top-1
    with a student's."""
    config = config or job.config
    aligner = build_aligner(config, job.registry, teacher_tokenizer, student_tokenizer, same_vocab, objective=None)
    if same_vocab or member(aligner, Aligner, "vocab_map")() is not None:
        return aligner
    fallback = job.registry.default("aligners")
    job.console.print(
        f"eval: aligner {config.aligner.name!r} has no vocabulary map; teacher agreement uses {fallback!r}"
    )
    return job.registry.get("aligners", fallback)(teacher_tokenizer, student_tokenizer)


def student_agreement(job, model, tokenizer, teacher_dirs: Mapping[str, str] | None = None) -> dict[str, float]:
    """Agreement and KL of one student with each teacher of the job that has weights to load, on held-out text;
    keys as in the eval stage. `teacher_dirs` (folders by teacher name) replace those teachers: the folder's model
    and tokenizer, in process, whatever the entry configured (model, tokenizer, address or store)."""
    dirs = dict(teacher_dirs or {})
    teachers = []
    for t in eval_teachers(job, None):
        if t.entry.name in dirs:
            own = dataclasses.replace(
                t.entry.teacher,
                model=str(dirs[t.entry.name]),
                tokenizer="",
                config="",
                address=(),
                store="",
                gguf_file="",
            )
            t = EvalTeacher(t.entry, dataclasses.replace(t.config, teacher=own), None, t.suffix)
        if _loadable(t):
            teachers.append(t)
        else:
            job.console.print(
                f"eval: {t.row} has no trained weights (only a config) and no fine-tuned copy in {job.run_dir}; "
                f"its agreement is not measured (pass --teacher {t.entry.name}=DIR)"
            )
    out: dict[str, float] = {}
    for t in teachers:
        teacher = t.build(job)
        try:
            out.update({f"{k}{t.suffix}": v for k, v in _agreement(job, t, teacher, model, tokenizer).items()})
        finally:
            teacher.close()
    return out


def parse_teacher_dirs(values: list[str], config: Config) -> dict[str, str]:
    """`dskd eval --teacher` values: `NAME=DIR` (a teacher of the job by name) or, for a job with one teacher, `DIR`."""
    names = [e.name for e in teacher_entries(config)]
    out: dict[str, str] = {}
    for value in values:
        name, eq, folder = value.partition("=")
        if not eq or (name not in names and Path(value).exists()):
            if len(names) > 1:
                raise DskdError(
                    f"--teacher {value}: the job has {len(names)} teachers ({', '.join(names)}); "
                    f"name the one this folder replaces, e.g. --teacher {names[0]}={value}"
                )
            name, folder = names[0], value
        elif name not in names:
            raise DskdError(
                f"--teacher {value}: the job has no teacher named {name!r}; its teachers: {', '.join(names)}"
            )
        if name in out:
            raise DskdError(f"--teacher names teacher {name!r} twice; give each teacher one folder")
        if not folder:
            raise DskdError(f"--teacher {value}: no folder after '='; write --teacher {name}=DIR")
        out[name] = folder
    return out


def _loadable(t: EvalTeacher) -> bool:
    """Whether a teacher has trained weights: a folder, a pretrained model or a server (a teacher built from a bare
    `config` is random until teacher_sft trains it, and agreement with it would mean nothing)."""
    return bool(t.path or t.config.teacher.model or t.config.teacher.address)


def evaluate_saved_model(
    config: Config, model_dir: str, *, teacher_dirs: Mapping[str, str] | None = None, registry: Any = None
) -> dict[str, Any]:
    """`dskd eval`: generation metrics of a saved model on the configured evaluation split and its top-1 agreement
    with, and per-token KL to, each teacher of the job that has weights on held-out text (keys as in the eval
    stage). A teacher's weights: its folder in `teacher_dirs` (by name), else its pretrained model or servers, else
    the copy the job's teacher_sft stage saved in run.output_dir; a teacher with none of these is skipped."""
    from dskd.console import Console
    from dskd.run.job import Job

    tokenizer = load_tokenizer(dataclasses.replace(config.student, tokenizer=model_dir, model=model_dir), "model")
    model = load_model(dataclasses.replace(config.student, model=model_dir), "model")
    metrics = generation_metrics(config, model, tokenizer)
    job = Job(config, registry)
    job.console = Console(enabled=job.console.enabled, stderr=True)  # stdout carries the metrics' JSON only
    metrics.update(student_agreement(job, model.to(job.device), tokenizer, teacher_dirs))
    return metrics
