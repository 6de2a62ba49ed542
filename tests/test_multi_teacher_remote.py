"""Two remote teachers (two teacher servers) give the losses of the same two teachers in process, each teacher's
wait is logged, and every teacher is asked for a micro-batch before any answer is awaited."""

from __future__ import annotations

import json
from concurrent.futures import Future

import pytest
import torch
from multi_teacher_job import write_multi_job
from teacher_server_harness import save_tiny_teacher, start_servers, stop_servers

from dskd.config import load_config
from dskd.registry import load_registry
from dskd.run.job import Job
from dskd.run.teacher_set import MultiSignalFetcher, TeacherSet
from dskd.types import Batch, SignalRequest, TeacherView

REGISTRY = load_registry()


def _teachers(models, *, remote=None, cache=None) -> list[dict]:
    out = []
    for i, (name, folder) in enumerate(models.items()):
        entry = {"name": name, "weight": 1.0 + i}
        if remote:
            entry.update(address=[remote[name]], wire_dtype="float32", cache_dir=str(cache))
        else:
            entry.update(model=str(folder), dtype="float32")
        out.append(entry)
    out[1]["route"] = {"category": ["list/*"]}
    return out


def _metrics(tmp, teachers) -> list[dict]:
    path = write_multi_job(tmp, teachers, steps=3, samples=24)
    job = Job(load_config(path, [], registry=REGISTRY), REGISTRY)
    job.run()
    return [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.integration
def test_two_remote_teachers_train_as_the_same_two_teachers_in_process(tmp_path):
    models = {
        "first": save_tiny_teacher(tmp_path / "first", hidden_size=32, layers=1, seed=1),
        "second": save_tiny_teacher(tmp_path / "second", hidden_size=32, layers=1, seed=2),
    }
    local = _metrics(tmp_path / "local", _teachers(models))
    servers = start_servers([(folder, (), name) for name, folder in models.items()], tmp_path / "servers")
    try:
        addresses = {name: server.address for name, server in zip(models, servers)}
        remote = _metrics(tmp_path / "remote", _teachers(models, remote=addresses, cache=tmp_path / "cache"))
    finally:
        stop_servers(servers)
    assert [r["step"] for r in remote] == [r["step"] for r in local] == [1, 2, 3]
    for a, b in zip(local, remote):
        for key in ("train/loss", "train/ce", "train/kd_teacher_space/first", "train/projector_ce/first"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])
    assert any("perf/teacher_wait_s/second" in r for r in remote)
    assert any(key.endswith("/first") and key.startswith("teacher/") for key in remote[-1])  # client counters


class _AsyncTeacher:
    """A remote-like teacher whose answers arrive only when the test says so, recording the order of events."""

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log, self.pending = name, log, []

    def score_async(self, ids, mask, rows, request):
        self.log.append(("submit", self.name))
        future: Future = Future()
        self.pending.append(future)
        original = future.result

        def result(timeout=None):
            self.log.append(("wait", self.name))
            return original(timeout)

        future.result = result
        return future


def test_every_teacher_is_asked_before_any_answer_is_awaited():
    log: list = []
    teachers = {name: _AsyncTeacher(name, log) for name in ("a", "b", "c")}
    fetcher = MultiSignalFetcher(TeacherSet(teachers), {name: SignalRequest(hidden_states=True) for name in teachers})
    ids = torch.zeros((1, 2), dtype=torch.int64)
    view = Batch(ids, ids + 1, ids, ids, ids + 1, ids).index_rows()
    batch = Batch(ids, ids + 1, ids, ids, ids + 1, ids)
    batch.teachers = {name: TeacherView(view, torch.zeros(1, dtype=torch.int64)) for name in teachers}
    handle = fetcher.submit(batch)
    assert log == [("submit", "a"), ("submit", "b"), ("submit", "c")]
    for teacher in teachers.values():
        teacher.pending[0].set_result(teacher.name)
    assert fetcher.result(handle) == {"a": "a", "b": "b", "c": "c"}
    assert log[3:] == [("wait", "a"), ("wait", "b"), ("wait", "c")]
    assert set(fetcher.waits) == {"a", "b", "c"}
