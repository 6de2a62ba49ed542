"""The optimizer and learning-rate schedule of a training stage, built outside the trainer so a test (or a
user) can hand `Trainer` any optimizer and drive `train_step` directly; and the weights of a step's
micro-batches (spec §0), the one place where `kd_rate`, split-step scales and the token count meet."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from dskd.config import TrainConfig
from dskd.kit.weights import LossWeights
from dskd.types import Batch


def lr_lambda(train: TrainConfig) -> Callable[[int], float]:
    """Multiplier of every group's peak learning rate at a step: linear warm-up, then the configured decay."""

    def factor(step: int) -> float:
        if train.warmup_steps and step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        decay_steps = max(train.max_steps - train.warmup_steps, 1)
        progress = min(max(step - train.warmup_steps, 0) / decay_steps, 1.0)
        floor = train.min_lr_ratio
        if train.schedule == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if train.schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        return 1.0

    return factor


def param_groups(model: torch.nn.Module, extra: torch.nn.Module | None, train: TrainConfig) -> list[dict]:
    """AdamW groups: decayed matrices, undecayed biases and norm weights (any 1-D parameter, which covers
    every architecture's norms, not only GPT-2's names), and the objective's projectors at their own lr."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": train.weight_decay, "lr": train.lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": train.lr},
    ]
    if extra is not None:
        params = [p for p in extra.parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, "weight_decay": train.weight_decay, "lr": train.projector_lr})
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: torch.nn.Module, projectors: torch.nn.Module | None, train: TrainConfig
) -> torch.optim.Optimizer:
    """AdamW over the student and the objective's projectors (`param_groups`)."""
    return torch.optim.AdamW(param_groups(model, projectors, train), betas=(0.9, 0.999), eps=1e-8)


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up and decay (`lr_lambda`). The trainer steps it once per optimizer step: accelerate's prepared
    scheduler would step it once per process, which shortens the schedule under data parallelism."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train))


def step_weights(window: list[Batch], kd_rate: float, accelerator) -> list[LossWeights]:
    """Each micro-batch's weights of its CE and distillation parts: `1 - kd_rate` and `kd_rate` (spec §1.3)
    over the step's loss denominator D (spec §0), with one collective for the global token counts.

    Batches that train both parts share D. When a policy split the step into CE-only and KD-only batches,
    each part is rescaled so that it is a mean over its own tokens across all processes.
    """
    counts = [(b.num_student_tokens(), b.ce, b.kd) for b in window]
    local = torch.tensor(
        [
            float(sum(n for n, _, _ in counts)),
            float(sum(n for n, ce, _ in counts if ce)),
            float(sum(n for n, _, kd in counts if kd)),
        ],
        device=accelerator.device,
    )
    summed = accelerator.reduce(local, reduction="sum") if accelerator.num_processes > 1 else local
    total, ce_total, kd_total = summed.tolist()
    denominator = max(total, 1.0) / accelerator.num_processes
    return [
        LossWeights.for_batch(
            kd_rate=kd_rate,
            denominator=denominator,
            ce_scale=total / ce_total if batch.ce and ce_total else 0.0,
            kd_scale=total / kd_total if batch.kd and kd_total else 0.0,
        )
        for batch in window
    ]
