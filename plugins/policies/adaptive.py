"""`adaptive`: DistiLLM-style adaptive off-policy distillation (Ko et al., 2024).

Student-generated outputs are used with a probability that starts at `init_prob` and rises by `increase`
(up to `max_prob`) whenever the training loss of a log interval is higher than the previous interval's —
the signal DistiLLM reads from its validation loss that the student has started to drift on its own
outputs. Generated samples go into a replay buffer of `buffer_size` micro-batches; with probability
`replay_prob` an on-policy micro-batch reuses a buffered one instead of sampling anew, which saves most of
the generation cost. Probability, buffer and generator state are checkpointed.
"""

from __future__ import annotations

import dskd
from dskd.kit import PolicyContext, StudentSampling


class Adaptive(StudentSampling):
    def __init__(self, context: PolicyContext, *, increase: float, max_prob: float, **kwargs) -> None:
        super().__init__(context, "adaptive", **kwargs)
        self.increase, self.max_prob = increase, max_prob
        self.previous: float | None = None

    def observe(self, step: int, metrics: dict) -> None:
        loss = metrics.get("train/loss")
        if loss is None:
            return
        if self.previous is not None and loss > self.previous:
            self.lam = min(self.lam + self.increase, self.max_prob)
        self.previous = loss

    def state_dict(self) -> dict:
        return {**super().state_dict(), "previous": self.previous}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.previous = state["previous"]


def adaptive(
    context: PolicyContext,
    *,
    init_prob: float = 0.0,
    increase: float = 0.1,
    max_prob: float = 0.8,
    buffer_size: int = 64,
    replay_prob: float = 0.5,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    ce_on_gold: bool = True,
) -> Adaptive:
    if not 0.0 <= max_prob <= 1.0 or increase < 0:
        raise dskd.PluginError(f"policy.max_prob must be in [0, 1] and increase >= 0, got {max_prob}, {increase}")
    return Adaptive(
        context,
        increase=increase,
        max_prob=max_prob,
        lam=min(init_prob, max_prob),
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        start_step=0,
        ce_on_gold=ce_on_gold,
        buffer_size=buffer_size,
        replay_prob=replay_prob,
    )


@dskd.hookimpl
def dskd_register_policies(register) -> None:
    register("adaptive", adaptive)
