"""A job: the stages of `dskd run` (teacher SFT -> distillation -> evaluation) and their outputs.

Run directory (`run.output_dir`):
    config.json         the resolved config
    metrics.jsonl       one line per log interval and stage
    checkpoints/<stage> resumable checkpoints (newest kept)
    teacher/            the SFT'd teacher (stage teacher_sft), Hugging Face format
    final/              the distilled student, Hugging Face format (AutoModelForCausalLM.from_pretrained)
    results.json        {"teacher": {...}, "student_init": {...}, "student": {...}} (stage eval)
    finished.json       the config the run finished with, written atomically after everything else: a run that
                        has it is read-only (`--resume` with the same config does nothing, with another is refused)
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
from dskd.data.streaming import StreamBatches, StreamSpec, rank_agreement
from dskd.errors import CheckpointError, DskdError
from dskd.kit import Objective, member
from dskd.kit.objective import same_vocabulary
from dskd.models.loading import load_model, load_tokenizer, save_pretrained_atomic, teacher_dtype
from dskd.models.lora import is_lora, save_lora
from dskd.models.teacher import tokenizer_fingerprint
from dskd.run.checkpoint import require_finite, written_world_size
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
from dskd.run.sharding import full_state_dict, is_sharded, plain_model, sharding_mode

OUTPUTS = ("checkpoints", "final", "teacher", "teachers", "results.json", "metrics.jsonl")
FINISHED = "finished.json"


class Job:
    def __init__(self, config: Config, registry: Any, *, resume: bool = False, force_resume: bool = False) -> None:
        from accelerate.utils import set_seed

        self.config = config
        self.registry = registry
        self.resume = resume
        self.force_resume = force_resume
        self.accelerator = make_accelerator("bf16" if config.train.precision == "bf16" else "no")
        sharding_mode(config.train, self.accelerator)  # at once: refuses DeepSpeed, and FSDP in one process
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
    def prepare_run_dir(self) -> bool:
        """Check and create the run directory; False when it holds this very run, finished (nothing to do)."""
        existing = [name for name in OUTPUTS if (self.run_dir / name).exists()]
        if existing and not self.resume:
            raise DskdError(
                f"run.output_dir {self.run_dir} already holds a run ({', '.join(existing)}); pass --resume to continue it, "
                f"or choose another directory (--set run.output_dir=...)"
            )
        finished = self.finished_config() if self.resume else None
        if finished is not None:
            changed = _changed_keys(finished, self.config.to_dict(), self._job_dir())
            if changed:
                raise DskdError(
                    f"run.output_dir {self.run_dir} holds a finished run, which is never changed, and this config differs from "
                    f"it in {_listed(changed)}; run it in another directory (--set run.output_dir=...)"
                )
            self.console.print(
                f"{self.run_dir} holds this run, finished; nothing to do (its results are in {self.run_dir / 'results.json'})"
            )
            return False
        written = written_world_size(self.run_dir) if self.resume else None
        if written is not None and written != self.accelerator.num_processes:
            # Checked before anything is written: the checkpoints are split by process (and by shard under FSDP).
            raise CheckpointError(
                f"the checkpoints in {self.run_dir / 'checkpoints'} were written by {written} processes but this run has "
                f"{self.accelerator.num_processes}; resume with {written} processes"
            )
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _write_json(self.run_dir / "config.json", self.config.to_dict())
        return True

    def _job_dir(self) -> str:
        # Paths in a config are resolved against its TOML file's folder; recorded so that a moved job still matches.
        return str(Path(self.config.source).resolve().parent) if self.config.source else ""

    def finished_config(self) -> dict[str, Any] | None:
        """`{"config": ..., "job_dir": ...}` of the finished run in `run_dir`, or None while it is not finished.

        Finished means `finished.json`, written last and atomically. Runs from before that marker count as
        finished once they have `results.json` (the evaluation, always the last stage), with their config.json.
        """
        marker, results, config = self.run_dir / FINISHED, self.run_dir / "results.json", self.run_dir / "config.json"
        try:
            if marker.exists():
                finished = json.loads(marker.read_text())
                return {"config": dict(finished["config"]), "job_dir": str(finished.get("job_dir", ""))}
            if results.exists() and config.exists():
                return {"config": json.loads(config.read_text()), "job_dir": ""}
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise DskdError(
                f"{marker if marker.exists() else config} cannot be read ({error}); the run directory is damaged, "
                f"run in another directory (--set run.output_dir=...)"
            ) from None
        return None

    # -- data ------------------------------------------------------------------------------------------------------
    def examples(self, split: str):
        return load_examples(getattr(self.config.data, split), self.config.data, split)

    def tokenized(
        self,
        split: str,
        student_tokenizer: Any,
        teacher_tokenizer: Any,
        aligner: Any = None,
        examples=None,
        sides: tuple[str, str] = ("student", "teacher"),
    ):
        examples = self.examples(split) if examples is None else examples
        # Tokenise (and align) once on the main process; the others then read the cache it wrote.
        with self.accelerator.main_process_first():
            return tokenize_split(
                examples,
                student_tokenizer,
                teacher_tokenizer,
                self.config.data,
                aligner=aligner,
                cache_dir=self.cache_dir,
                num_workers=self.config.data.num_workers,
                split=split,
                sides=sides,
            )

    def train_batches(
        self,
        student_tokenizer: Any,
        teacher_tokenizer: Any,
        aligner: Any,
        batch_size: int,
        examples=None,
        sides: tuple[str, str] = ("student", "teacher"),
    ):
        """`StageSpec.make_batches` of the training split: in memory (tokenised once, cached, shuffled per epoch),
        or with `data.streaming` read in order and encoded on the fly (`dskd.data.streaming`)."""
        data = self.config.data
        student_pad, teacher_pad = student_tokenizer.pad_token_id, (teacher_tokenizer or student_tokenizer).pad_token_id
        if not data.streaming:
            dataset = self.tokenized("train", student_tokenizer, teacher_tokenizer, aligner, examples, sides=sides)
            return dataset, self.batches(dataset, batch_size, student_pad, teacher_pad)
        acc = self.accelerator
        spec = StreamSpec(data.train, data, "train", batch_size, acc.process_index, acc.num_processes)
        collate_fn = functools.partial(collate, student_pad_id=student_pad, teacher_pad_id=teacher_pad)
        same = teacher_tokenizer is None or tokenizer_fingerprint(teacher_tokenizer) == tokenizer_fingerprint(
            student_tokenizer
        )

        def make(consumed: int) -> StreamBatches:
            return StreamBatches(
                spec,
                student_tokenizer,
                None if same else teacher_tokenizer,
                aligner,
                collate_fn,
                consumed=consumed,
                num_workers=data.num_workers,
                agree=rank_agreement(acc),
            )

        return None, make

    def batches(
        self, dataset, batch_size: int, student_pad: int, teacher_pad: int, *, shuffle: bool = True, collate_fn=None
    ):
        """`make(consumed)` of resumable shuffled batches of `dataset`; `collate_fn` replaces the one-teacher collate
        (several teachers collate their views with `dskd.data.multi_teacher`)."""
        acc = self.accelerator
        if collate_fn is None:
            collate_fn = functools.partial(collate, student_pad_id=student_pad, teacher_pad_id=teacher_pad)

        def make(consumed: int):
            sampler = ResumableBatchSampler(
                len(dataset),
                batch_size,
                seed=self.config.run.seed,
                shuffle=shuffle,
                rank=acc.process_index,
                world_size=acc.num_processes,
                start_batch=consumed,
            )
            return iter(make_loader(dataset, sampler, collate_fn, self.config.data.num_workers))

        return make

    # -- stages ------------------------------------------------------------------------------------------------
    def teacher_sft(
        self, *, config: Config | None = None, examples=None, target: Path | None = None, stage: str = "teacher_sft"
    ) -> Path:
        """Supervised fine-tuning of the teacher on the training split (the default job's tiny teacher). With
        several teachers (`dskd.run.teachers`) each is trained by this, with its own `config` (the job as if it were
        the one [teacher]), its routed `examples`, its `target` folder and its `stage` name."""
        target = self.run_dir / "teacher" if target is None else target
        if (target / "config.json").exists():
            self.console.print(f"teacher_sft: reusing the trained teacher in {target}")
            return target
        cfg = self.config if config is None else config
        tokenizer = load_tokenizer(cfg.teacher, "teacher")
        # Trained weights stay float32 ("auto" is an inference default; AdamW on bfloat16 weights loses updates).
        sft_cfg = dataclasses.replace(cfg.teacher, dtype="float32") if cfg.teacher.dtype == "auto" else cfg.teacher
        model = load_model(sft_cfg, "teacher", seed=cfg.run.seed + 1).to(self.device)
        teacher_as_student = Student(model, tokenizer)
        objective, ce_terms = build_objective(
            cfg, self.registry, teacher_as_student, None, None, name=self.registry.default("objectives", "teacher_sft")
        )
        sft = cfg.teacher_sft
        _, make_batches = self.train_batches(
            tokenizer, None, None, sft.batch_size, examples, sides=("teacher", "teacher")
        )
        train = dataclasses.replace(
            cfg.train,
            max_steps=sft.steps,
            lr=sft.lr,
            batch_size=sft.batch_size,
            warmup_steps=sft.warmup_steps,
            grad_accum=1,
        )
        policy = self.registry.get("policies", self.registry.default("policies"))(None)
        spec = StageSpec(
            stage,
            model,
            objective,
            policy,
            None,
            make_batches,
            train,
            self.run_dir,
            cfg.run.log_every,
            {"tokenizer": tokenizer_fingerprint(tokenizer)},
            kd_rate=0.0,
            ce_terms=ce_terms,
        )
        trained = Trainer.for_stage(spec, self.accelerator, self.console).run(
            resume=self.resume, force=self.force_resume
        )
        require_finite(trained, None, f"fine-tuned teacher in {target}")
        self._save_model(trained, tokenizer, target)
        return target

    def distill(self, teacher_path: Path | None) -> Path:
        cfg = self.config
        student = build_student(cfg, self.device)
        teacher = build_teacher(
            cfg, self.device, model_path=str(teacher_path) if teacher_path else None, cache_dir=self.cache_dir
        )
        same_vocab = same_vocabulary(teacher.tokenizer, student.tokenizer)
        aligner = build_aligner(
            cfg, self.registry, teacher.tokenizer, student.tokenizer, same_vocab, objective=cfg.objective.name
        )
        objective, ce_terms = build_objective(cfg, self.registry, student, teacher, aligner)
        description = member(objective, Objective, "describe")()
        if description:
            self.console.print(f"distill: {cfg.objective.name}: {description}")
        # A stream is never held: its prompts are not known up front (no built-in policy needs them).
        examples = [] if cfg.data.streaming else self.examples("train")
        policy = build_policy(
            cfg,
            self.registry,
            student,
            teacher,
            aligner,
            cache_dir=self.cache_dir,
            prompts=tuple(e.prompt for e in examples),
            objective=objective,
        )
        dataset, make_batches = self.train_batches(
            student.tokenizer, teacher.tokenizer, None if same_vocab else aligner, cfg.train.batch_size, examples
        )
        # Counted over the whole split in memory; a stream is not read ahead for it.
        mismatches = (
            sum(dataset["text_differs"]) if dataset is not None and "text_differs" in dataset.column_names else 0
        )
        if mismatches:
            self.console.warn(
                f"data.train: in {mismatches} of {len(dataset)} samples the two tokenizers disagree about the text "
                f"(a normaliser rewrote it, or a literal special-token string); the aligner pairs around each difference "
                f"(logged as data/normalisation_mismatches)"
            )
        self.console.print(
            f"distill: objective {cfg.objective.name}, divergence {cfg.divergence.name}, policy {policy_name(cfg, self.registry)}, "
            f"{'same vocabulary' if same_vocab else getattr(aligner, 'label', f'aligner {type(aligner).__name__}')}, teacher {teacher.fingerprint[:12]}, "
            f"teacher dtype {teacher_dtype(teacher)}"
        )
        spec = StageSpec(
            "distill",
            student.model,
            objective,
            policy,
            teacher,
            make_batches,
            cfg.train,
            self.run_dir,
            cfg.run.log_every,
            {
                "teacher": teacher.fingerprint,
                "student_tokenizer": tokenizer_fingerprint(student.tokenizer),
                "teacher_tokenizer": tokenizer_fingerprint(teacher.tokenizer),
            },
            kd_rate=cfg.objective.kd_rate if distils(self.registry, cfg.objective.name) else 0.0,
            ce_terms=ce_terms,
            data_metrics={"data/normalisation_mismatches": float(mismatches)}
            if not same_vocab and not cfg.data.streaming
            else {},
        )
        trained = Trainer.for_stage(spec, self.accelerator, self.console).run(
            resume=self.resume, force=self.force_resume
        )
        final = self.run_dir / "final"
        require_finite(
            trained, None, f"distilled student in {final}"
        )  # no final/ (and so no results.json) of NaN weights
        self._save_model(trained, student.tokenizer, final)
        teacher.close()
        return final

    def _save_model(self, model: torch.nn.Module, tokenizer: Any, target: Path) -> None:
        """Write a trained model as one ordinary Hugging Face folder from the main process: a sharded model is
        gathered first (all processes take part); a LoRA student is its adapter, or merged (`student.merge_lora`)."""
        state = full_state_dict(model) if is_sharded(model) else None
        if self.accelerator.is_main_process:
            if is_lora(model):
                _write_atomic(
                    target,
                    lambda tmp: save_lora(
                        model, tokenizer, tmp, merge=self.config.student.merge_lora, state_dict=state
                    ),
                )
            else:
                save_pretrained_atomic(model if state is None else plain_model(model, state), tokenizer, target)
        self.accelerator.wait_for_everyone()

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
        if not self.prepare_run_dir():
            results = self.run_dir / "results.json"
            return json.loads(results.read_text()) if results.exists() else {}
        stages = self.config.run.stages
        if self.config.teachers:  # several teachers: dskd.run.teachers
            return self._run_teachers(stages)
        teacher_path = self.teacher_sft() if "teacher_sft" in stages else None
        if teacher_path is None and (self.run_dir / "teacher" / "config.json").exists():
            teacher_path = self.run_dir / "teacher"
        final = self.distill(teacher_path) if "distill" in stages else None
        if final is None and (self.run_dir / "final" / "config.json").exists():
            final = self.run_dir / "final"
        results = self.evaluate(teacher_path, final) if "eval" in stages else {}
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:  # last, so that its presence means every output above is complete
            _write_json(self.run_dir / FINISHED, {"config": self.config.to_dict(), "job_dir": self._job_dir()})
        self.console.print(f"run directory: {self.run_dir}")
        return results

    def _run_teachers(self, stages: tuple[str, ...]) -> dict[str, Any]:
        from dskd.run import teachers

        trained = {e.name: self.run_dir / teachers.TEACHERS_DIR / e.name for e in self.config.teachers}
        trained = {n: p for n, p in trained.items() if (p / "config.json").exists()}
        if "teacher_sft" in stages:
            trained = teachers.teacher_sft(self)
        self.teacher_paths = trained  # the fine-tuned teachers by name, for the eval stage
        final = teachers.distill(self, trained) if "distill" in stages else None
        if final is None and (self.run_dir / "final" / "config.json").exists():
            final = self.run_dir / "final"
        results = self.evaluate(None, final) if "eval" in stages else {}
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            _write_json(self.run_dir / FINISHED, {"config": self.config.to_dict(), "job_dir": self._job_dir()})
        self.console.print(f"run directory: {self.run_dir}")
        return results


def run_job(config: Config, *, registry: Any, resume: bool = False, force_resume: bool = False) -> dict[str, Any]:
    return Job(config, registry, resume=resume, force_resume=force_resume).run()


def evaluate_model(
    config: Config, model_dir: str, *, teacher_dir: str | None = None, registry: Any = None
) -> dict[str, Any]:
    """`dskd eval` of a job with one teacher (`teacher_dir` replaces it); see
    `dskd.evaluation.stage.evaluate_saved_model`, which takes a folder per teacher."""
    from dskd.config_teachers import teacher_entries
    from dskd.evaluation.stage import evaluate_saved_model

    dirs = {teacher_entries(config)[0].name: teacher_dir} if teacher_dir else None
    return evaluate_saved_model(config, model_dir, teacher_dirs=dirs, registry=registry)


def _changed_keys(finished: dict[str, Any], new: dict[str, Any], job_dir: str) -> list[str]:
    """Dotted keys whose values differ between a finished run's config and `new` (as written to JSON). The run
    directory itself is not compared, and paths inside each job's folder are compared relative to it, so a job
    folder moved or copied elsewhere with its run is still the same run."""

    def flat(table: dict[str, Any], base: str) -> dict[str, Any]:
        table = json.loads(json.dumps(table))
        out = {}
        for name, values in table.items():
            if name == "teachers" and isinstance(values, list):  # [[teachers]]: compared entry by entry, by name
                values = {f"{e.get('name')}.{k}": v for e in values if isinstance(e, dict) for k, v in e.items()}
            for key, value in values.items() if isinstance(values, dict) else ():
                if base and isinstance(value, str) and value.startswith(base + os.sep):
                    value = "<job folder>" + value[len(base) :]
                out[f"{name}.{key}"] = value
        return out

    before, after = flat(finished["config"], finished["job_dir"]), flat(new, job_dir)
    # Values changed first, then keys only one side has (a config written by another dskd version).
    keys = sorted(
        (k for k in before.keys() | after.keys() if k != "run.output_dir" and before.get(k) != after.get(k)),
        key=lambda k: (not (k in before and k in after), k),
    )
    return [f"{k} ({before[k]!r} -> {after[k]!r})" if k in before and k in after else k for k in keys]


def _listed(keys: list[str], most: int = 6) -> str:
    # One readable line even when a config from another dskd version differs in dozens of keys.
    return ", ".join(keys[:most]) + (f" and {len(keys) - most} more" if len(keys) > most else "")


def _write_atomic(directory: Path, write) -> None:
    """`write(tmp)` into a sibling temporary folder, then swapped in for `directory` (as `save_pretrained_atomic`)."""
    import shutil

    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    write(tmp)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    if old.exists():
        shutil.rmtree(old)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
