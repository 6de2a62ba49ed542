"""Training against a teacher server gives the losses of training against the same teacher in process."""

from __future__ import annotations

import json

import pytest
from teacher_server_harness import save_tiny_teacher, start_servers, stop_servers
from tiny_job import write_job

from dskd.config import load_config
from dskd.registry import load_registry
from dskd.run.job import Job

REGISTRY = load_registry()


def _losses(tmp, overrides) -> list[dict]:
    path = write_job(tmp, steps=3)
    job = Job(load_config(path, overrides, registry=REGISTRY), REGISTRY)
    job.prepare_run_dir()
    job.distill(None)
    return [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.integration
@pytest.mark.parametrize("wire_dtype, tolerance", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_first_losses_with_a_remote_teacher_equal_those_with_the_local_teacher(tmp_path, wire_dtype, tolerance):
    teacher_dir = save_tiny_teacher(tmp_path / "teacher", hidden_size=32, layers=1)
    local = _losses(tmp_path / "local", [f"teacher.model={teacher_dir}", "objective.name=dskd_v2"])
    [server] = start_servers([(teacher_dir, (), "teacher")], tmp_path / "servers")
    try:
        remote = _losses(
            tmp_path / "remote",
            [
                f'teacher.address=["{server.address}"]',
                'teacher.config=""',
                f"teacher.wire_dtype={wire_dtype}",
                "objective.name=dskd_v2",
                f"teacher.cache_dir={tmp_path / 'cache'}",
            ],
        )
    finally:
        stop_servers([server])
    assert [r["step"] for r in remote] == [r["step"] for r in local] == [1, 2, 3]
    for a, b in zip(local, remote):
        for key in ("train/loss", "train/ce", "train/kd_teacher_space", "train/projector_ce"):
            assert abs(a[key] - b[key]) <= tolerance * max(1.0, abs(a[key])), (key, a[key], b[key])
