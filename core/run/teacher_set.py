"""The teachers of a stage as the engine sees them: one teacher, or a `TeacherSet` of several (`[[teachers]]`)
whose signals are asked for all at once (`MultiSignalFetcher`)."""

from __future__ import annotations

import time
from typing import Any

from dskd.kit.contracts import member
from dskd.models.prefetch import SignalFetcher
from dskd.models.teacher import Teacher
from dskd.types import Batch


class TeacherSet:
    """The job's teachers by name, in its order; what the engine holds as the stage's teacher."""

    def __init__(self, teachers: dict[str, Any]) -> None:
        self.teachers = dict(teachers)

    def __getitem__(self, name: str) -> Any:
        return self.teachers[name]

    def items(self):
        return self.teachers.items()

    def stats(self) -> dict[str, float]:
        """Each teacher's counters (a remote teacher's calls and retries), as `<counter>/<name>`."""
        out = {}
        for name, teacher in self.teachers.items():
            out.update({f"{key}/{name}": value for key, value in member(teacher, Teacher, "stats")().items()})
        return out

    def close(self) -> None:
        for teacher in self.teachers.values():
            member(teacher, Teacher, "close")()


class MultiSignalFetcher:
    """A `SignalFetcher` per teacher. `submit` asks every teacher for its view of the micro-batch before any answer
    is awaited, so remote teachers compute at the same time (each over its own channel, with its own failover);
    `result` waits for them in turn and records how long each was waited for (`waits`)."""

    def __init__(self, teachers: TeacherSet, requests: dict[str, Any]) -> None:
        self.fetchers = {name: SignalFetcher(teachers[name], request) for name, request in requests.items()}
        self.active = any(f.active for f in self.fetchers.values())
        self.waits: dict[str, float] = {}

    def submit(self, batch: Batch):
        if not self.active or not batch.teachers:
            return None
        return {name: self.fetchers[name].submit(view.batch) for name, view in batch.teachers.items()}

    def result(self, handle) -> dict[str, Any] | None:
        self.waits = {}
        if handle is None:
            return None
        out = {}
        for name, pending in handle.items():
            start = time.perf_counter()
            out[name] = SignalFetcher.result(pending)
            self.waits[name] = time.perf_counter() - start
        return out


def make_fetcher(teacher: Any, objective: Any):
    """The engine's fetcher: one per teacher for a `TeacherSet`, else the single `SignalFetcher`."""
    if isinstance(teacher, TeacherSet):
        return MultiSignalFetcher(teacher, objective.requests)
    return SignalFetcher(teacher, objective.request)
