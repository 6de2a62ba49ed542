"""FSDP2 for students that do not fit one device: which runs shard, how the student is sharded, and the few
operations that differ from DDP (gradient clipping, sharded checkpoints, the whole model for `final/`).

Design. Each decoder block is its own `fully_shard` unit and the root holds the rest (embeddings, final norm, LM
head). The objectives read the LM head through `dskd.kit.lm_head.HeadView`, which resolves the head's weight at
each use: between the model's forward and its backward the root's parameters stay unsharded (FSDP2 does not
reshard the root after forward, since backward needs them at once), so the chunked loss reads the whole head,
its gradient lands in the unsharded parameter and FSDP reduce-scatters it with the tied input embedding's in
the root's post-backward. The alternative, keeping the head whole on every rank while only the blocks shard
(`keep_head_whole=True`, measured by `benchmarks/bench_sharding.py`), needs no gather but replicates `V x d`
weights with their gradients and Adam state on every rank, which at a 150k vocabulary is gigabytes per rank.

Projectors stay whole on every rank; `dskd.run.launch.average_gradients` averages their gradients, as under DDP.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from dskd.errors import ModelError
from dskd.run.launch import LaunchError

FSDP = "fsdp"


def sharding_mode(train: Any, accelerator, env: dict[str, str] | None = None) -> str:
    """ "fsdp" when the student is to be sharded (`train.sharding`, or accelerate's FSDP plugin), else "none";
    refuses what cannot run as asked, in one line, before anything is built.

    accelerate's launcher asks for FSDP or DeepSpeed through the environment of the processes it starts; its
    `Accelerator` turns that into a distributed type only on GPUs (on CPUs it would silently run DDP), so the
    environment is read here as well.
    """
    from accelerate.utils import DistributedType

    env = os.environ if env is None else env
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED or _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        raise LaunchError(
            "DeepSpeed is not supported by dskd; to shard a student that does not fit one device use FSDP2: "
            'train.sharding = "fsdp" (or `accelerate launch --use_fsdp --fsdp_version 2`)'
        )
    mode = train.sharding
    if kind == DistributedType.FSDP or _flag(env, "ACCELERATE_USE_FSDP"):
        plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
        version = getattr(plugin, "fsdp_version", None) or int(env.get("FSDP_VERSION", "1") or 1)
        if version != 2:
            raise LaunchError(
                f"accelerate's FSDP plugin is set to FSDP version {version}, but dskd shards with FSDP2 only; "
                "set fsdp_version: 2 in the accelerate config (or `--fsdp_version 2`)"
            )
        mode = FSDP
    if mode == FSDP and accelerator.num_processes < 2:
        raise LaunchError(
            'train.sharding = "fsdp" needs 2 or more processes, but this run has 1 (one process has nothing to shard '
            'over); launch several (`torchrun --nproc_per_node N -m dskd run FILE`) or use sharding = "none"'
        )
    return mode


def _flag(env, name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes")


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks (HF's `_no_split_modules` classes: LlamaDecoderLayer, GPT2Block, ...)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ModelError(
            f"{type(base).__name__} declares no decoder block classes (_no_split_modules), so dskd cannot tell what to "
            f'shard; use sharding = "none" for this model'
        )
    return blocks


def shard_student(model: torch.nn.Module, *, bf16: bool, keep_head_whole: bool = False) -> torch.nn.Module:
    """Shard `model` in place with `fully_shard`: each decoder block, then the root. With `bf16`, blocks compute
    in bfloat16 while weights, gradients reduction and optimizer state stay float32 (`MixedPrecisionPolicy`)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    )
    for block in decoder_blocks(model):
        fully_shard(block, mp_policy=policy)
    ignored = None
    if keep_head_whole:
        head = model.get_output_embeddings()
        ignored = {p for p in head.parameters()}
    fully_shard(model, mp_policy=policy, ignored_params=ignored)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def whole_parameters(params: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """The parameters of `params` that every rank holds whole (not DTensor shards)."""
    from torch.distributed.tensor import DTensor

    return [p for p in params if not isinstance(p, DTensor)]


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float, group=None) -> torch.Tensor:
    """Global gradient norm over sharded (DTensor) and whole parameters, and clipping to `max_norm` (0: none).

    Each element of a sharded gradient lives on exactly one rank, so the squares of the local shards are summed
    over ranks; whole gradients (projectors, ignored parameters) are already equal on every rank and are added
    once. The clip coefficient is torch's: `min(max_norm / (norm + 1e-6), 1)`.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    local = [g.to_local() for g in grads if isinstance(g, DTensor)]
    whole = [g for g in grads if not isinstance(g, DTensor)]
    device = (local or whole or [torch.zeros(())])[0].device
    sharded_sq = torch.zeros((), dtype=torch.float32, device=device)
    for g in local:
        sharded_sq = sharded_sq + g.float().pow(2).sum()
    if dist.is_initialized():
        dist.all_reduce(sharded_sq, group=group)
    whole_sq = torch.zeros((), dtype=torch.float32, device=device)
    for g in whole:
        whole_sq = whole_sq + g.float().pow(2).sum()
    norm = (sharded_sq + whole_sq).sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in local + whole:
            g.mul_(coef.to(g.dtype))
    return norm


def _container(model: torch.nn.Module, projectors: torch.nn.Module | None) -> torch.nn.Module:
    # One module over everything the optimizer holds, so DCP names each optimizer entry by a parameter path.
    parts = {"student": model}
    if projectors is not None:
        parts["projectors"] = projectors
    return torch.nn.ModuleDict(parts)


def save_sharded(path: Path, model: torch.nn.Module, projectors, optimizer) -> None:
    """Every rank writes its shards of the student and of the optimizer state to `path` (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(_container(model, projectors), optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(path))


def load_sharded(path: Path, model: torch.nn.Module, projectors, optimizer) -> None:
    """Read what `save_sharded` wrote into the sharded student and optimizer (a collective; same world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    container = _container(model, projectors)
    model_state, optim_state = get_state_dict(container, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(container, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole student's state on the main process's CPU (empty elsewhere); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def plain_model(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An ordinary (unsharded) Hugging Face model of `model`'s architecture holding `state`, for `save_pretrained`."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model.config)
    plain.load_state_dict(state, assign=True)
    plain.tie_weights()
    return plain
