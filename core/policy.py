"""What a policy plugin receives at setup, and what the engine expects of it.

A policy decides, per micro-batch, which sequences are distilled: the dataset's responses (off-policy),
the student's own samples (on-policy), the teacher's samples (sequence-level KD), or a mix. The factory is
called once as `factory(context, **options)` and may refuse a combination it cannot serve with a sentence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from dskd.types import Batch


@dataclass(frozen=True)
class PolicyContext:
    student: torch.nn.Module
    student_tokenizer: Any
    teacher: Any  # a `dskd.teacher.Teacher` or None
    aligner: Any  # the configured aligner, or None for the same vocabulary
    data: Any  # the `DataConfig` (lengths; used to tokenise new responses exactly like the dataset's)
    seed: int
    prompts: tuple[str, ...] = ()  # the training split's prompt texts, indexed by `Batch.sample_ids`
    objective_name: str = ""
    cache_dir: str = ""
    objective: Any = None  # the built objective (its `request` says whether it uses the teacher at all), or None

    @property
    def max_length(self) -> int:
        return self.data.max_length


@runtime_checkable
class Policy(Protocol):
    def prepare(self, batch: Batch, step: int) -> Batch:
        """The micro-batch to distil at optimizer step `step` (may be `batch` itself)."""
        ...

    def state_dict(self) -> dict:
        """What a resumed run needs to continue identically (RNG, replay buffer, ...)."""
        ...

    def load_state_dict(self, state: dict) -> None: ...

    # Optional: `observe(step, metrics)` is called after each log interval with the reduced metrics.
