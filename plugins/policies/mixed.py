"""`mixed`: GKD-style mixing (Agarwal et al., 2024): each micro-batch is on-policy with probability `lam`,
otherwise the dataset's responses are used. The draws come from the policy's own seeded generator, which
is checkpointed, so a resumed run makes the same choices."""

from __future__ import annotations

import dskd
from dskd.kit import PolicyContext, StudentSampling


def mixed(
    context: PolicyContext,
    *,
    lam: float = 0.5,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    start_step: int = 0,
    ce_on_gold: bool = True,
) -> StudentSampling:
    return StudentSampling(
        context,
        "mixed",
        lam=lam,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        start_step=start_step,
        ce_on_gold=ce_on_gold,
    )


@dskd.hookimpl
def dskd_register_policies(register) -> None:
    register("mixed", mixed)
