"""Loading students and teachers: pretrained weights, or a random initialisation from an HF config."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dskd.config import ModelConfig
from dskd.errors import ModelError
from dskd.models.gguf import converted_checkpoint, gguf_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def default_dtype(device: torch.device | str) -> str:
    """The one default compute dtype of a teacher, in process or on a server: bfloat16 on CUDA (fast, and what
    large teachers are trained in), float32 elsewhere (bfloat16 on CPU is several times slower). One rule for
    both, so a remote teacher gives the losses of the same teacher in process without flags."""
    return "bfloat16" if torch.device(device).type == "cuda" else "float32"


def resolve_dtype(name: str, device: torch.device | str | None = None) -> torch.dtype:
    """`name` as a torch dtype; "auto" is `default_dtype` of `device` (default: cuda when available)."""
    if name == "auto":
        name = default_dtype(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    return DTYPES[name]


def teacher_dtype(teacher) -> str:
    """The compute dtype a built teacher runs in (in process: its weights; remote: what the server reports)."""
    model = getattr(teacher, "model", None)
    if model is not None:
        return str(next(model.parameters()).dtype).removeprefix("torch.")
    info = getattr(teacher, "info", None)
    names = {1: "bfloat16", 2: "float16", 3: "float32"}
    return names.get(int(getattr(info, "compute_dtype", 0)), "unknown")


def load_tokenizer(cfg: ModelConfig, role: str):
    """The fast tokenizer of a student or teacher, with a pad token (EOS when the tokenizer has none)."""
    from transformers import AutoTokenizer

    source = cfg.tokenizer or checkpoint_source(cfg.model, cfg.gguf_file, role)
    if cfg.tokenizer and gguf_path(cfg.tokenizer):
        source = checkpoint_source(cfg.tokenizer, "", role)
    if not source:
        raise ModelError(
            f"{role}.tokenizer is empty and there is no {role}.model to take it from; set {role}.tokenizer"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # transformers raises OSError/ValueError with long multi-line texts
        raise ModelError(
            f"cannot load the {role} tokenizer from {source!r} ({_first_line(exc)}); point {role}.tokenizer at a local "
            f"folder with tokenizer.json (no model hub is reachable without network)"
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(
            f"the {role} tokenizer at {source!r} has no fast backend; dskd needs tokenizer.json (a fast tokenizer) for offsets and alignment"
        )
    if not tokenizer("Hello world", add_special_tokens=False)["input_ids"]:
        # transformers builds an empty tokenizer from a folder with only tokenizer_config.json; every prompt
        # would then tokenise to nothing and fail later as "the prompt is empty".
        raise ModelError(
            f"the {role} tokenizer at {source!r} has no vocabulary (it encodes text to nothing); point {role}.tokenizer at a folder with tokenizer.json"
        )
    if tokenizer.eos_token_id is None:
        raise ModelError(
            f"the {role} tokenizer at {source!r} has no EOS token; set eos_token in its tokenizer_config.json"
        )
    return ensure_pad_token(install_chat_template(tokenizer, getattr(cfg, "chat_template", ""), role))


def install_chat_template(tokenizer, path: str, role: str):
    """Give the tokenizer the Jinja chat template in `path` (the job's `<role>.chat_template`), replacing its own;
    saved with it, so a distilled student keeps the template it was trained with. Empty `path`: unchanged."""
    if not path:
        return tokenizer
    try:
        tokenizer.chat_template = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(
            f"{role}.chat_template {path}: cannot be read ({exc}); point it at a UTF-8 Jinja template file"
        ) from None
    return tokenizer


def checkpoint_source(model: str, gguf_file: str, role: str) -> str:
    """What transformers loads for a model setting: the setting itself, or for a GGUF file (`model` ending in
    `.gguf`, or a folder plus `gguf_file`) the float checkpoint converted from it (dskd.models.gguf)."""
    path = gguf_path(model, gguf_file)
    return str(converted_checkpoint(path, role)) if path is not None else model


def ensure_pad_token(tokenizer):
    """Give a tokenizer without a pad token its EOS as pad: labels mark padding with -100, so the pad id
    itself is never trained (also applied to tokenizers fetched from a teacher server)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    cfg: ModelConfig,
    role: str,
    *,
    seed: int | None = None,
    path: str | None = None,
    device: torch.device | str | None = None,
) -> torch.nn.Module:
    """An HF causal LM from `cfg.model` (or `path`), or built from `cfg.config` with seeded random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = resolve_dtype(cfg.dtype, device)
    source = path or checkpoint_source(cfg.model, cfg.gguf_file, role)
    if source:
        try:
            return AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        except Exception as exc:
            raise ModelError(
                f"cannot load the {role} model from {source!r} ({_first_line(exc)}); point {role}.model at a local folder "
                f"saved with save_pretrained, or set {role}.config to build a random-init model"
            ) from None
    try:
        config = AutoConfig.from_pretrained(cfg.config)
    except Exception as exc:
        raise ModelError(
            f"cannot read the {role} config {cfg.config!r} ({_first_line(exc)}); point {role}.config at an HF config.json"
        ) from None
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def check_vocabulary(model: torch.nn.Module, tokenizer, role: str) -> None:
    """The model's embedding table must cover every id of its tokenizer."""
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise ModelError(
            f"the {role} model has {rows} embedding rows but its tokenizer has {len(tokenizer)} tokens; "
            f"use the tokenizer that belongs to this model or set vocab_size >= {len(tokenizer)} in its config"
        )


def save_pretrained_atomic(model: torch.nn.Module, tokenizer, directory: str | Path) -> Path:
    """Save model and tokenizer in Hugging Face format without ever leaving a half-written folder in place.

    Written to a sibling temporary folder, then swapped in with renames; an interrupted save leaves the
    previous folder (if any) untouched.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    _remove(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    _remove(old)
    return directory


def _remove(path: Path) -> None:
    import shutil

    if path.exists():
        shutil.rmtree(path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
