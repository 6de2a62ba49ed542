"""`off_policy`: distil on the dataset's own responses (teacher-forced), the standard setting of DSKD."""

from __future__ import annotations

import dskd
from dskd import Batch
from dskd.kit import Policy, PolicyContext


class OffPolicy(Policy):
    # `prepare` returns its input unchanged, so the engine may ask the teacher for a batch before the student
    # has finished the previous step (cross-step prefetch with a remote teacher).
    prefetchable = True

    def prepare(self, batch: Batch, step: int) -> list[Batch]:
        batch.meta.setdefault("policy", "off_policy")
        return [batch]


def off_policy(context: PolicyContext) -> OffPolicy:
    return OffPolicy()


off_policy.default = True  # the policy of a job that names none, and of the teacher_sft stage
off_policy.teacher_store = True  # only the dataset's sequences: a teacher store holds every one of them
off_policy.multi_teacher = True  # the same sequences for every teacher: each scores its own tokenisation of them


@dskd.hookimpl
def dskd_register_policies(register) -> None:
    register("off_policy", off_policy)
