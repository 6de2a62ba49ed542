"""A job: the stages of `dskd run` (teacher SFT -> distillation -> evaluation) and their outputs.

Run directory (`run.output_dir`):
    config.json         the resolved config
    metrics.jsonl       one line per log interval and stage
    checkpoints/<stage> resumable checkpoints (newest kept)
    teacher/            the SFT'd teacher (stage teacher_sft), Hugging Face format
    final/              the distilled student, Hugging Face format (AutoModelForCausalLM.from_pretrained)
    results.json        {"teacher": {...}, "student_init": {...}, "student": {...}} (stage eval)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any

import torch

from dskd.config import Config
from dskd.console import Console
from dskd.data.batching import ResumableBatchSampler, collate, make_loader
from dskd.data.examples import load_examples, tokenize_split
from dskd.errors import DskdError
from dskd.kit import Objective, member
from dskd.kit.objective import same_vocabulary
from dskd.models.loading import load_model, load_tokenizer, save_pretrained_atomic
from dskd.models.teacher import tokenizer_fingerprint
from dskd.run.components import (
    Student,
    build_aligner,
    build_objective,
    build_policy,
    build_student,
    build_teacher,
    distils,
    policy_name,
)
from dskd.run.engine import StageSpec, Trainer
from dskd.run.launch import make_accelerator

OUTPUTS = ("checkpoints", "final", "teacher", "results.json", "metrics.jsonl")


class Job:
    def __init__(self, config: Config, registry: Any, *, resume: bool = False, force_resume: bool = False) -> None:
        from accelerate.utils import set_seed

        self.config = config
        self.registry = registry
        self.resume = resume
        self.force_resume = force_resume
        self.accelerator = make_accelerator("bf16" if config.train.precision == "bf16" else "no")
        self.console = Console(enabled=self.accelerator.is_main_process)
        self.run_dir = Path(config.run.output_dir)
        self.cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else self.run_dir / "cache"
        set_seed(config.run.seed)
        if config.run.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    # -- run directory -----------------------------------------------------------------------------------------
    def prepare_run_dir(self) -> None:
        existing = [name for name in OUTPUTS if (self.run_dir / name).exists()]
        if existing and not self.resume:
            raise DskdError(
                f"run.output_dir {self.run_dir} already holds a run ({', '.join(existing)}); pass --resume to continue it, "
                f"or choose another directory (--set run.output_dir=...)"
            )
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _write_json(self.run_dir / "config.json", self.config.to_dict())

    # -- data ------------------------------------------------------------------------------------------------------
    def examples(self, split: str):
        return load_examples(getattr(self.config.data, split), self.config.data, split)

    def tokenized(self, split: str, student_tokenizer: Any, teacher_tokenizer: Any, aligner: Any = None, examples=None):
        examples = self.examples(split) if examples is None else examples
        # Tokenise (and align) once on the main process; the others then read the cache it wrote.
        with self.accelerator.main_process_first():
            return tokenize_split(examples, student_tokenizer, teacher_tokenizer, self.config.data, aligner=aligner,
                                  cache_dir=self.cache_dir, num_workers=self.config.data.num_workers, split=split)

    def batches(self, dataset, batch_size: int, student_pad: int, teacher_pad: int, *, shuffle: bool = True):
        acc = self.accelerator
        collate_fn = functools.partial(collate, student_pad_id=student_pad, teacher_pad_id=teacher_pad)

        def make(consumed: int):
            sampler = ResumableBatchSampler(len(dataset), batch_size, seed=self.config.run.seed, shuffle=shuffle,
                                            rank=acc.process_index, world_size=acc.num_processes, start_batch=consumed)
            return iter(make_loader(dataset, sampler, collate_fn, self.config.data.num_workers))

        return make

    # -- stages ------------------------------------------------------------------------------------------------
    def teacher_sft(self) -> Path:
        """Supervised fine-tuning of the teacher on the training split (the default job's tiny teacher)."""
        target = self.run_dir / "teacher"
        if (target / "config.json").exists():
            self.console.print(f"teacher_sft: reusing the trained teacher in {target}")
            return target
        cfg = self.config
        tokenizer = load_tokenizer(cfg.teacher, "teacher")
        model = load_model(cfg.teacher, "teacher", seed=cfg.run.seed + 1).to(self.device)
        teacher_as_student = Student(model, tokenizer)
        objective, ce_terms = build_objective(cfg, self.registry, teacher_as_student, None, None,
                                              name=self.registry.default("objectives", "teacher_sft"))
        dataset = self.tokenized("train", tokenizer, None)
        sft = cfg.teacher_sft
        train = dataclasses.replace(cfg.train, max_steps=sft.steps, lr=sft.lr, batch_size=sft.batch_size,
                                    warmup_steps=sft.warmup_steps, grad_accum=1)
        policy = self.registry.get("policies", self.registry.default("policies"))(None)
        spec = StageSpec("teacher_sft", model, objective, policy, None,
                         self.batches(dataset, sft.batch_size, tokenizer.pad_token_id, tokenizer.pad_token_id),
                         train, self.run_dir, cfg.run.log_every, {"tokenizer": tokenizer_fingerprint(tokenizer)},
                         kd_rate=0.0, ce_terms=ce_terms)
        trained = Trainer(spec, self.accelerator, self.console).run(resume=self.resume, force=self.force_resume)
        if self.accelerator.is_main_process:
            save_pretrained_atomic(trained, tokenizer, target)
        self.accelerator.wait_for_everyone()
        return target

    def distill(self, teacher_path: Path | None) -> Path:
        cfg = self.config
        student = build_student(cfg, self.device)
        teacher = build_teacher(cfg, self.device, model_path=str(teacher_path) if teacher_path else None, cache_dir=self.cache_dir)
        same_vocab = same_vocabulary(teacher.tokenizer, student.tokenizer)
        aligner = build_aligner(cfg, self.registry, teacher.tokenizer, student.tokenizer, same_vocab, objective=cfg.objective.name)
        objective, ce_terms = build_objective(cfg, self.registry, student, teacher, aligner)
        description = member(objective, Objective, "describe")()
        if description:
            self.console.print(f"distill: {cfg.objective.name}: {description}")
        examples = self.examples("train")
        policy = build_policy(cfg, self.registry, student, teacher, aligner, cache_dir=self.cache_dir,
                              prompts=tuple(e.prompt for e in examples), objective=objective)
        dataset = self.tokenized("train", student.tokenizer, teacher.tokenizer, None if same_vocab else aligner, examples)
        self.console.print(
            f"distill: objective {cfg.objective.name}, divergence {cfg.divergence.name}, policy {policy_name(cfg, self.registry)}, "
            f"{'same vocabulary' if same_vocab else f'aligner {type(aligner).__name__}'}, teacher {teacher.fingerprint[:12]}"
        )
        spec = StageSpec(
            "distill", student.model, objective, policy, teacher,
            self.batches(dataset, cfg.train.batch_size, student.tokenizer.pad_token_id, teacher.tokenizer.pad_token_id),
            cfg.train, self.run_dir, cfg.run.log_every,
            {"teacher": teacher.fingerprint, "student_tokenizer": tokenizer_fingerprint(student.tokenizer),
             "teacher_tokenizer": tokenizer_fingerprint(teacher.tokenizer)},
            kd_rate=cfg.objective.kd_rate if distils(self.registry, cfg.objective.name) else 0.0, ce_terms=ce_terms,
        )
        trained = Trainer(spec, self.accelerator, self.console).run(resume=self.resume, force=self.force_resume)
        final = self.run_dir / "final"
        if self.accelerator.is_main_process:
            save_pretrained_atomic(trained, student.tokenizer, final)
        self.accelerator.wait_for_everyone()
        teacher.close()
        return final

    def evaluate(self, teacher_path: Path | None, final: Path | None) -> dict[str, Any]:
        from dskd.evaluation.stage import evaluate_stage

        results = evaluate_stage(self, teacher_path, final)
        if self.accelerator.is_main_process:
            _write_json(self.run_dir / "results.json", results)
            if "student" in results:  # the report plots evaluation over steps from metrics.jsonl
                self._append_eval_line(results["student"])
        return results

    def _append_eval_line(self, metrics: dict[str, Any]) -> None:
        step = self.config.train.max_steps if "distill" in self.config.run.stages else 0
        record = {"stage": "eval", "step": step}
        record.update({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        with (self.run_dir / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def run(self) -> dict[str, Any]:
        self.prepare_run_dir()
        stages = self.config.run.stages
        teacher_path = self.teacher_sft() if "teacher_sft" in stages else None
        if teacher_path is None and (self.run_dir / "teacher" / "config.json").exists():
            teacher_path = self.run_dir / "teacher"
        final = self.distill(teacher_path) if "distill" in stages else None
        if final is None and (self.run_dir / "final" / "config.json").exists():
            final = self.run_dir / "final"
        results = self.evaluate(teacher_path, final) if "eval" in stages else {}
        self.console.print(f"run directory: {self.run_dir}")
        return results


def run_job(config: Config, *, registry: Any, resume: bool = False, force_resume: bool = False) -> dict[str, Any]:
    return Job(config, registry, resume=resume, force_resume=force_resume).run()


def evaluate_model(config: Config, model_dir: str, *, teacher_dir: str | None = None, registry: Any = None) -> dict[str, Any]:
    """`dskd eval`: generation metrics of a saved model on the configured evaluation split and, with a teacher
    (`teacher_dir`, or a pretrained or remote teacher in the config), its top-1 agreement with that teacher and
    per-token KL to it on held-out text."""
    from dskd.evaluation.stage import generation_metrics, student_agreement

    tokenizer = load_tokenizer(dataclasses.replace(config.student, tokenizer=model_dir, model=model_dir), "model")
    model = load_model(dataclasses.replace(config.student, model=model_dir), "model")
    metrics = generation_metrics(config, model, tokenizer)
    if teacher_dir or config.teacher.model or config.teacher.address:
        if teacher_dir:
            config = dataclasses.replace(config, teacher=dataclasses.replace(config.teacher, model=teacher_dir, tokenizer="", config="", address=()))
        job = Job(config, registry)
        metrics.update(student_agreement(job, model.to(job.device), tokenizer))
    return metrics


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
