"""LoRA students through `peft`: the `[student] lora` table, the adapted model, and what `final/` holds.

Only the adapters train (plus the objective's projectors, which live outside the model). The LM head stays
frozen unless the user names it in `target_modules`; it then trains whole, through peft's `modules_to_save`
(a low-rank update of the head would make its logits differ from `head.weight`, which every objective reads).
A frozen head keeps DSKDv2's closed-form student-to-teacher map constant, so it is computed once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dskd.errors import ConfigProblem, ModelError

KEYS = ("r", "alpha", "dropout", "target_modules")


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    """Rank of each adapter."""
    alpha: float = 32.0
    """Scale numerator: the update is (alpha / r) * B @ A."""
    dropout: float = 0.05
    """Dropout on the adapters' input."""
    target_modules: tuple[str, ...] = ()
    """Module names (or name suffixes) to adapt; empty: peft's default for the architecture."""


def lora_problems(student: Any) -> list[ConfigProblem]:
    """Every problem of `student.lora` and `student.merge_lora`, for the config check."""
    table, problems = student.lora, []
    if not table:
        if student.merge_lora:
            problems.append(
                ConfigProblem(
                    "student.merge_lora", "is true but student.lora is empty", "set student.lora or drop merge_lora"
                )
            )
        return problems
    for key in table:
        if key not in KEYS:
            problems.append(ConfigProblem(f"student.lora.{key}", "unknown key", f"use {', '.join(KEYS)}"))
    r, alpha, dropout = table.get("r", 16), table.get("alpha", 32.0), table.get("dropout", 0.05)
    if not (isinstance(r, int) and not isinstance(r, bool) and r >= 1):
        problems.append(ConfigProblem("student.lora.r", f"must be an integer >= 1, got {r!r}", "use e.g. 16"))
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0):
        problems.append(ConfigProblem("student.lora.alpha", f"must be > 0, got {alpha!r}", "use e.g. 32"))
    if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout < 1):
        problems.append(ConfigProblem("student.lora.dropout", f"must be in [0, 1), got {dropout!r}", "use e.g. 0.05"))
    targets = table.get("target_modules", [])
    if isinstance(targets, str):
        targets = [targets]
    if not (isinstance(targets, list) and all(isinstance(t, str) and t for t in targets)):
        problems.append(
            ConfigProblem(
                "student.lora.target_modules",
                f"must be a list of module names, got {targets!r}",
                'use e.g. ["q_proj", "v_proj"]',
            )
        )
    if not student.model:
        problems.append(
            ConfigProblem(
                "student.lora",
                "needs pretrained weights, but student.model is empty (LoRA adapts fixed base weights)",
                "set student.model to a saved model or hub id, or drop student.lora",
            )
        )
    return problems


def lora_settings(table: dict) -> LoraSettings:
    """The checked `student.lora` table as typed settings (`lora_problems` has already run)."""
    targets = table.get("target_modules", ())
    return LoraSettings(
        r=int(table.get("r", 16)),
        alpha=float(table.get("alpha", 32.0)),
        dropout=float(table.get("dropout", 0.05)),
        target_modules=(targets,) if isinstance(targets, str) else tuple(targets),
    )


def head_module_name(model: torch.nn.Module) -> str:
    """The dotted name of the model's LM head module (e.g. "lm_head")."""
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is head:
            return name
    raise ModelError(f"{type(model).__name__}: its LM head is not one of its modules; dskd cannot adapt it with LoRA")


def apply_lora(model: torch.nn.Module, settings: LoraSettings, name: str = "student") -> torch.nn.Module:
    """`model` with LoRA adapters (a `peft.PeftModel`); every failure is one line naming the fix."""
    from peft import LoraConfig, get_peft_model
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    model_type = getattr(model.config, "model_type", type(model).__name__)
    targets = list(settings.target_modules)
    if not targets:
        targets = list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type, ()))
        if not targets:
            raise ModelError(
                f"{name}.lora: peft has no default LoRA target modules for model type {model_type!r}; "
                f"name them in {name}.lora.target_modules (its linear layers, e.g. the attention projections)"
            )
    head = head_module_name(model)
    head_leaf = head.rsplit(".", 1)[-1]
    # The head named in target_modules trains whole (see the module docstring), not through an adapter.
    train_head = any(t in (head, head_leaf) for t in targets)
    adapted = [t for t in targets if t not in (head, head_leaf)]
    if not adapted:
        raise ModelError(
            f"{name}.lora.target_modules names only the LM head ({head}), which trains whole, so no adapter would be added; "
            f"add the modules to adapt, e.g. the attention projections"
        )
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=adapted,
        modules_to_save=[head_leaf] if train_head else None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        adapted_model = get_peft_model(model, config)
    except (ValueError, TypeError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if "not found in the base model" in first:
            modules = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise ModelError(
                f"{name}.lora.target_modules {adapted} match no module of {type(model).__name__}; "
                f"its linear layers are named {', '.join(modules[:12])}"
            ) from None
        raise ModelError(
            f"{name}.lora: peft cannot add LoRA adapters to {type(model).__name__} with target_modules {adapted} ({first}); "
            f"name linear layers of the model in {name}.lora.target_modules"
        ) from None
    return adapted_model


def is_lora(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def checkpoint_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a resumable checkpoint keeps of the student: its whole state, or for a LoRA student only the tensors
    that train (adapters, a listed head); the frozen base is the same `student.model` at every resume, so writing
    it with every checkpoint would cost the whole model's size on disk for nothing."""
    state = model.state_dict()
    if not is_lora(model):
        return state
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: value for name, value in state.items() if name in trained}


def load_checkpoint_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Restore `checkpoint_state`'s tensors; for a LoRA student every trained tensor must be among them."""
    if not is_lora(model):
        model.load_state_dict(state)
        return
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trained - state.keys())
    if missing:
        raise ModelError(
            f"the checkpoint lacks {len(missing)} trained LoRA tensors of the student (e.g. {missing[0]}); "
            f"it was written with other student.lora settings: resume with those, or start afresh"
        )
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise ModelError(
            f"the checkpoint holds {len(unexpected)} tensors this LoRA student does not have (e.g. {unexpected[0]}); "
            f"it was written with other student.lora settings: resume with those, or start afresh"
        )


def save_lora(
    model: torch.nn.Module, tokenizer, directory: Path, *, merge: bool, state_dict: dict | None = None
) -> None:
    """Write a LoRA student into `directory` (a fresh folder): the adapter (`PeftModel.from_pretrained(base,
    directory)`), or with `merge` the merged model (`AutoModelForCausalLM.from_pretrained(directory)`) and the adapter
    in `directory/adapter`. `state_dict`: the model's full state (gathered from shards) when `model` is sharded."""
    import copy

    directory.mkdir(parents=True, exist_ok=True)
    adapter_dir = directory / "adapter" if merge else directory
    # peft picks the adapter's entries out of `state_dict` (the sharded model's own tensors are shards).
    model.save_pretrained(adapter_dir, **({} if state_dict is None else {"state_dict": state_dict}))
    tokenizer.save_pretrained(directory)
    if merge:
        plain = copy.deepcopy(model) if state_dict is None else _unsharded_copy(model, state_dict)
        merged = plain.merge_and_unload()
        merged.save_pretrained(directory)


def _unsharded_copy(model: torch.nn.Module, state_dict: dict) -> torch.nn.Module:
    """A plain (unsharded) copy of a sharded peft model, holding `state_dict`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_config = model.get_base_model().config
    base = AutoModelForCausalLM.from_config(base_config)
    plain = PeftModel(base, model.peft_config[model.active_adapter])
    plain.load_state_dict(state_dict)
    return plain
