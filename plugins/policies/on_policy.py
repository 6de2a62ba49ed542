"""`on_policy`: distil on the student's own samples (spec §7; GKD with lambda = 1).

From optimizer step `start_step` on, every micro-batch's prompts are answered by the student (temperature,
top-p, at most `max_new_tokens`, eval mode, seeded), and the teacher scores those answers; across tokenizers
the answers are decoded, re-tokenised by the teacher's tokenizer and aligned in one batched host step. The CE
stays on the dataset's responses (`ce_on_gold`, spec §7.1), each part normalised over its own tokens.
"""

from __future__ import annotations

import dskd
from dskd.kit import PolicyContext, StudentSampling


def on_policy(
    context: PolicyContext,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    start_step: int = 0,
    ce_on_gold: bool = True,
) -> StudentSampling:
    return StudentSampling(
        context,
        "on_policy",
        lam=1.0,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        start_step=start_step,
        ce_on_gold=ce_on_gold,
    )


@dskd.hookimpl
def dskd_register_policies(register) -> None:
    register("on_policy", on_policy)
