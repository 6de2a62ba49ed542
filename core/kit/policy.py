"""What a policy plugin receives at setup, and what the engine expects of it.

A policy decides, per micro-batch, which sequences are distilled: the dataset's responses (off-policy),
the student's own samples (on-policy), the teacher's samples (sequence-level KD), or a mix. The factory is
called once as `factory(context, **options)` and may refuse a combination it cannot serve with a sentence;
the object it returns is a `Policy`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dskd.types import Batch


@dataclass(frozen=True)
class PolicyContext:
    student: torch.nn.Module
    student_tokenizer: Any
    teacher: Any  # a `dskd.models.teacher.Teacher` or None
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


class Policy:
    """What the engine uses of a policy. Subclass it, or provide the same members: those with a default here
    are optional."""

    prefetchable: bool = False
    """True when `prepare` returns its input unchanged (off-policy): the engine may then ask the teacher about
    the next step's batch while the student computes this one."""

    def prepare(self, batch: Batch, step: int) -> list[Batch]:
        """The micro-batches to distil for `batch` at optimizer step `step`: `[batch]` itself, or e.g. a CE batch
        of the dataset's responses and a KD batch of the student's samples (`Batch.ce` / `Batch.kd`)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """What a resumed run needs to continue identically (RNG, replay buffer, ...)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""

    def observe(self, step: int, metrics: dict[str, float]) -> None:
        """Called after each log interval with the reduced metrics (adaptive policies react to them)."""
