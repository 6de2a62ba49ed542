"""Asking the teacher ahead: the signal of the next micro-batch is requested while the student computes this
one, when the teacher answers asynchronously (`Teacher.score_async`, a remote teacher); otherwise the call is
made when the signal is needed."""

from __future__ import annotations

from typing import Any

from dskd.kit.contracts import member
from dskd.models.teacher import Teacher
from dskd.types import Batch, SignalRequest, TeacherSignal


class SignalFetcher:
    def __init__(self, teacher: Any, request: SignalRequest) -> None:
        self.teacher = teacher
        self.request = request
        self.active = teacher is not None and not request.empty

    def submit(self, batch: Batch):
        """A handle for `batch`'s signal: a future, a deferred call, or None when no teacher is asked."""
        if not self.active:
            return None
        args = (batch.teacher_input_ids, batch.teacher_attention_mask, batch.teacher_rows, self.request)
        future = member(self.teacher, Teacher, "score_async")(*args)
        return future if future is not None else (lambda: self.teacher.score(*args))

    @staticmethod
    def result(handle) -> TeacherSignal | None:
        if handle is None:
            return None
        return handle() if callable(handle) else handle.result()
