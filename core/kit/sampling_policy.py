"""Distilling on the student's own samples: the machinery shared by the on_policy, mixed and adaptive policies.

Per micro-batch, with probability `lam` (1 for on_policy; GKD's lambda for mixed; adaptive for DistiLLM), the
student samples a response to each prompt (eval mode, seeded per step and micro-batch, through HF
`generate`), and the step trains the KD on those samples and the CE on the dataset's responses (spec §7.1),
each normalised over its own tokens. Optionally a replay buffer serves earlier samples instead of new ones
(DistiLLM's off-policy reuse of student-generated outputs).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from dskd.errors import PluginError
from dskd.kit.policy import Policy, PolicyContext
from dskd.kit.rollout import Rollouts, generation_seed, split_step
from dskd.models.generation import sample_continuations
from dskd.types import Batch


class StudentSampling(Policy):
    def __init__(
        self,
        context: PolicyContext,
        name: str,
        *,
        lam: float,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        start_step: int,
        ce_on_gold: bool,
        buffer_size: int = 0,
        replay_prob: float = 0.0,
    ) -> None:
        for key, value, low, high in (
            ("lam", lam, 0.0, 1.0),
            ("top_p", top_p, 1e-6, 1.0),
            ("replay_prob", replay_prob, 0.0, 1.0),
        ):
            if not low <= value <= high:
                raise PluginError(f"policy.{key} must be in [{low}, {high}], got {value}")
        if temperature <= 0:
            raise PluginError(f"policy.temperature must be > 0 for sampling, got {temperature}")
        if max_new_tokens < 1 or start_step < 0 or buffer_size < 0:
            raise PluginError("policy.max_new_tokens must be >= 1, start_step and buffer_size >= 0")
        if context.teacher is None:
            raise PluginError(f"policy {name} distils student samples against a teacher; configure one")
        if context.objective is not None and context.objective.request.empty:
            # The samples train only the KD part of a split step; an objective that never asks the teacher has none.
            raise PluginError(
                f"policy {name} distils the student's samples against the teacher, but objective "
                f"{context.objective_name or type(context.objective).__name__!r} uses no teacher signal, so the samples would "
                "train nothing; use policy off_policy or teacher_generated with it, or a distillation objective"
            )
        self.name = name
        self.context = context
        self.rollouts = Rollouts(context)
        self.lam, self.temperature, self.top_p = lam, temperature, top_p
        self.max_new_tokens, self.start_step, self.ce_on_gold = max_new_tokens, start_step, ce_on_gold
        self.replay_prob = replay_prob
        self.buffer: deque[list[dict[str, Any]]] = deque(maxlen=buffer_size or None)
        self.buffer_size = buffer_size
        self.rng = np.random.default_rng(np.random.SeedSequence([context.seed, 0x0F0F]))
        self.step, self.index = -1, 0  # micro-batch counter within a step, for distinct sampling seeds

    def prepare(self, batch: Batch, step: int) -> list[Batch]:
        if step != self.step:
            self.step, self.index = step, 0
        self.index += 1
        if step < self.start_step or self.rng.random() >= self.lam:
            batch.meta["policy"] = "off_policy"
            return [batch]
        if self.buffer_size and len(self.buffer) and self.rng.random() < self.replay_prob:
            rows = self.buffer[int(self.rng.integers(len(self.buffer)))]
            sampled = self.rollouts.collate(rows, batch)
            sampled.meta["policy"] = f"{self.name}:replay"
        else:
            rows = self.sample_rows(batch, step)
            if self.buffer_size:
                self.buffer.append(rows)
            sampled = self.rollouts.collate(rows, batch)
            sampled.meta["policy"] = f"{self.name}:sampled"
        return split_step(batch, sampled, ce_on_gold=self.ce_on_gold)

    def sample_rows(self, batch: Batch, step: int) -> list[dict[str, Any]]:
        prompts = self.rollouts.student_prompts(batch)
        continuations = sample_continuations(
            self.context.student,
            self.context.student_tokenizer,
            prompts,
            max_new_tokens=self.rollouts.max_new_tokens(batch, self.max_new_tokens),
            temperature=self.temperature,
            top_p=self.top_p,
            seed=generation_seed(self.context.seed, step, self.index),
        )
        return self.rollouts.student_sample_rows(batch, continuations)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "lam": self.lam, "buffer": list(self.buffer)}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.lam = state["lam"]
        self.buffer = deque(state["buffer"], maxlen=self.buffer_size or None)
