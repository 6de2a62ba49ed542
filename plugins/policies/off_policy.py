"""`off_policy`: distil on the dataset's own responses (teacher-forced), the standard setting of DSKD."""

from __future__ import annotations

import dskd
from dskd.policy import PolicyContext
from dskd.types import Batch


class OffPolicy:
    # `prepare` returns its input unchanged, so the engine may ask the teacher for a batch before the student
    # has finished the previous step (cross-step prefetch with a remote teacher).
    prefetchable = True

    def prepare(self, batch: Batch, step: int) -> Batch:
        batch.meta.setdefault("policy", "off_policy")
        return batch

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def off_policy(context: PolicyContext) -> OffPolicy:
    return OffPolicy()


@dskd.hookimpl
def dskd_register_policies(register) -> None:
    register("off_policy", off_policy)
