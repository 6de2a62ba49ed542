"""Building a run's parts from the config and the registry, in the order of ARCHITECTURE §2's setup.

Each builder turns one config table into a ready object and turns every way it can fail into a sentence.
The engine itself never looks at plugin names: it receives the built objects.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dskd.config import Config, plugin_options
from dskd.errors import PluginError
from dskd.kit.chunked import auto_chunk_rows
from dskd.kit.contracts import member
from dskd.kit.lm_head import head_view
from dskd.kit.objective import ObjectiveContext, same_vocabulary, student_ce_terms
from dskd.kit.policy import PolicyContext
from dskd.models.loading import (
    check_vocabulary,
    ensure_pad_token,
    install_chat_template,
    load_model,
    load_tokenizer,
)
from dskd.models.lora import apply_lora, lora_settings
from dskd.models.teacher import LocalTeacher, Teacher
from dskd.run.plugin_checks import CheckedAligner, checked_divergence, describe


def build_teacher(
    config: Config, device: torch.device, *, model_path: str | None = None, cache_dir: Path | None = None
):
    """The configured teacher: a `StoreTeacher` when `teacher.store` is set, a gRPC `RemoteTeacher` when
    `teacher.address` is, else a `LocalTeacher`."""
    t = config.teacher
    if t.store:  # signals precomputed on disk, no teacher process (dskd.store); checked against the job there
        from dskd.store.teacher import open_store_teacher

        return open_store_teacher(config, device, model_path=model_path, cache_dir=cache_dir)
    if t.address:
        from dskd.servers.client import RemoteTeacher  # grpc is only imported for remote teachers

        token = None
        if t.auth_token_env:
            token = os.environ.get(t.auth_token_env)
            if not token:
                raise PluginError(
                    f"teacher.auth_token_env names {t.auth_token_env!r} but that environment variable is not set; export it with the servers' token"
                )
        teacher = RemoteTeacher(
            list(t.address),
            auth_token=token,
            tls_ca_file=t.tls_ca_file or None,
            timeout_s=t.timeout_s,
            retry_timeout_s=t.retry_timeout_s,
            wire_dtype=t.wire_dtype,
            cache_dir=t.cache_dir or (str(cache_dir) if cache_dir else None),
            device=device,
        )
        install_chat_template(ensure_pad_token(teacher.tokenizer), t.chat_template, "teacher")
        return teacher
    tokenizer = load_tokenizer(_with_tokenizer_fallback(t, model_path), "teacher")
    model = load_model(t, "teacher", seed=config.run.seed + 1, path=model_path)
    check_vocabulary(model, tokenizer, "teacher")
    # As on a teacher server: a local folder says nothing about the model (a moved run or model folder is the
    # same teacher), so only a hub id enters the fingerprint by name; weights, config and tokenizer always do.
    source = model_path or t.model or t.config
    return LocalTeacher(model.to(device), tokenizer, model_id="" if os.path.exists(source) else source)


def _with_tokenizer_fallback(cfg, model_path: str | None):
    """A teacher trained by the teacher_sft stage saves its tokenizer beside it; use it when none is set."""
    from dataclasses import replace

    if model_path and not cfg.tokenizer:
        return replace(cfg, tokenizer=model_path)
    return cfg


def bind_divergence(config: Config, registry: Any):
    """The configured divergence with its options bound; capability attributes are carried over."""
    fn = registry.get("divergences", config.divergence.name)
    options = plugin_options(config.divergence, fn, skip=("temperature",))
    # Checked on its first call, so a plugin returning the wrong shape is named instead of failing inside an objective.
    bound = functools.partial(
        checked_divergence(fn, describe(registry, "divergences", config.divergence.name)), **options
    )
    bound.accepts_sparse_teacher = registry.declared("divergences", config.divergence.name, "accepts_sparse_teacher")
    return bound


def build_aligner(
    config: Config,
    registry: Any,
    teacher_tokenizer: Any,
    student_tokenizer: Any,
    same_vocab: bool,
    *,
    objective: str | None = None,
):
    """The aligner: the configured one; else the default the objective `objective` declares on its factory
    (`default_aligner`, e.g. uld -> index, mined_kd -> mined); else none for identical vocabularies and the
    aligner that declares itself the default (eta) for different ones. `objective=None` skips the objective's
    default (the evaluation stage measures teacher agreement with the same alignment whatever objective
    trained the student)."""
    default = registry.declared("objectives", objective, "default_aligner") if objective else ""
    name = config.aligner.name or default or ("" if same_vocab else registry.default("aligners"))
    if not name:
        return None
    factory = registry.get("aligners", name)
    options = plugin_options(config.aligner, factory)
    try:
        # Every alignment, of the dataset and of sampled responses alike, is checked against the contract.
        return CheckedAligner(
            factory(teacher_tokenizer, student_tokenizer, **options), describe(registry, "aligners", name)
        )
    except PluginError:
        raise
    except (TypeError, ValueError) as exc:
        raise PluginError(f"aligner {name!r} cannot be built with options {options}: {exc}") from None


@dataclass
class Student:
    model: torch.nn.Module
    tokenizer: Any


def build_student(config: Config, device: torch.device, *, fresh: bool = False) -> Student:
    """The student (pretrained, or random-init from its config with the run's seed), with LoRA adapters when
    `student.lora` is set (`fresh`: the plain model, e.g. the evaluation's untrained baseline)."""
    tokenizer = load_tokenizer(config.student, "student")
    model = load_model(config.student, "student", seed=config.run.seed)
    check_vocabulary(model, tokenizer, "student")
    if config.student.gradient_checkpointing and not fresh:
        # Non-reentrant: the reentrant variant drops the gradients of adapters inside a block whose input needs no
        # gradient (frozen embeddings under LoRA), and it is the variant FSDP2 composes with.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.student.lora and not fresh:
        model = apply_lora(model, lora_settings(config.student.lora), "student")
    return Student(model.to(device), tokenizer)


def build_objective(
    config: Config, registry: Any, student: Student, teacher: Any, aligner: Any, *, name: str | None = None
):
    """The configured objective (or `name`), and the student's gold CE alone for the engine's split steps."""
    name = name or config.objective.name
    factory = registry.get("objectives", name)
    # A view, read at each use: FSDP2 swaps the student's parameters between shards and whole tensors.
    head = head_view(student.model, len(student.tokenizer), name="student")
    same_vocab = teacher is None or same_vocabulary(teacher.tokenizer, student.tokenizer)
    context = ObjectiveContext(
        student=student.model,
        student_tokenizer=student.tokenizer,
        student_head=head,
        teacher=teacher,
        divergence=bind_divergence(config, registry),
        divergence_name=config.divergence.name,
        temperature=config.objective.temperature,
        chunk_size=config.train.chunk_size
        or auto_chunk_rows(
            (len(student.tokenizer), None if teacher is None else teacher.vocab_size),
            (head.hidden_size, None if teacher is None else teacher.hidden_size),
        ),
        aligner=aligner,
        same_vocab=same_vocab,
    )
    options = plugin_options(config.objective, factory) if name == config.objective.name else {}
    objective = factory(context, **options)
    if teacher is not None and not objective.request.empty:
        missing = _missing_capabilities(objective.request, teacher)
        if missing:
            raise PluginError(f"objective {name!r} needs {missing} from the teacher, which it does not offer")
        refusal = member(teacher, Teacher, "check_request")(objective.request)
        if refusal:
            raise PluginError(f"objective {name!r} cannot use this teacher: {refusal}")
    return objective, functools.partial(student_ce_terms, head, chunk_size=context.chunk_size)


def distils(registry: Any, name: str) -> bool:
    """Whether objective `name` has distillation parts for `kd_rate` to weigh (`sft` has the CE alone)."""
    return bool(registry.declared("objectives", name, "needs_teacher"))


def _missing_capabilities(request, teacher) -> str:
    needs = []
    if request.hidden_states and "hidden_states" not in teacher.capabilities:
        needs.append("hidden states")
    if request.top_k and "top_k" not in teacher.capabilities:
        needs.append("top-k log-probabilities")
    if request.logits and "logits" not in teacher.capabilities:
        needs.append("dense logits")
    return ", ".join(needs)


def build_policy(
    config: Config,
    registry: Any,
    student: Student,
    teacher: Any,
    aligner: Any,
    *,
    cache_dir: Path,
    prompts: tuple[str, ...] = (),
    objective: Any = None,
):
    name = policy_name(config, registry)
    factory = registry.get("policies", name)
    context = PolicyContext(
        student=student.model,
        student_tokenizer=student.tokenizer,
        teacher=teacher,
        aligner=aligner,
        data=config.data,
        seed=config.run.seed,
        prompts=prompts,
        objective_name=config.objective.name,
        cache_dir=str(cache_dir),
        objective=objective,
    )
    try:
        return factory(context, **plugin_options(config.policy, factory))
    except (TypeError, ValueError) as exc:
        raise PluginError(f"policy {name!r}: {exc}") from None


def policy_name(config: Config, registry: Any) -> str:
    """The configured policy, or the one that declares itself the default."""
    return config.policy.name or registry.default("policies")
