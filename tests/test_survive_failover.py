"""Several teachers: a replica killed mid-run costs no batch (none lost, none counted twice), the client and the
metrics record the failover, and a replica restarted on its port is used again."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from teacher_server_harness import (
    ServerProcess,
    launch_server,
    save_tiny_teacher,
    start_servers,
    stop_servers,
    wait_serving,
)
from tiny_job import write_job

from dskd.config import load_config
from dskd.registry import load_registry
from dskd.run.job import Job
from dskd.servers.client import RemoteTeacher
from dskd.types import SignalRequest

pytestmark = pytest.mark.integration
REGISTRY = load_registry()
STEPS = 16
KILL_AFTER_STEP = 3
WAIT = 120.0  # seconds: generous for a loaded 2-core machine


def _kill(server: ServerProcess) -> None:
    server.process.kill()  # SIGKILL: no drain, no goodbye; connections simply break
    server.process.wait(30)


def _until(condition, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _batch(seed: int):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 32000, (2, 20), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    rows = torch.nonzero(mask.reshape(-1)).reshape(-1)
    return ids, mask, rows


def test_client_fails_over_when_a_replica_dies_and_uses_it_again_once_restarted(tmp_path):
    model = save_tiny_teacher(tmp_path / "model", hidden_size=32, layers=1)
    first, second = start_servers([(model, (), "first"), (model, (), "second")], tmp_path / "servers")
    restarted = None
    try:
        request = SignalRequest(hidden_states=True, top_k=4)
        with RemoteTeacher(
            [first.address, second.address], cache_dir=tmp_path / "cache", wire_dtype="float32", timeout_s=30
        ) as teacher:
            expected = [teacher.score(*_batch(i), request) for i in range(4)]
            before = teacher.stats()
            assert before[f"calls/{first.address}"] > 0 and before[f"calls/{second.address}"] > 0
            assert before["healthy_replicas"] == 2 and before["failovers"] == 0

            _kill(first)
            # Every batch is answered in full (by the survivor), exactly as before the crash: nothing lost,
            # nothing zero-filled, no answer of a failed attempt mixed in.
            for i in range(4):
                signal = teacher.score(*_batch(i), request)
                for name in ("hidden_states", "topk_ids", "topk_logprobs", "tail_logmass"):
                    assert torch.equal(getattr(signal, name), getattr(expected[i], name)), name
            after = teacher.stats()
            assert after["failovers"] >= 1 and after["healthy_replicas"] == 1
            assert after[f"calls/{first.address}"] == before[f"calls/{first.address}"]
            assert after[f"calls/{second.address}"] >= before[f"calls/{second.address}"] + 4

            process, port_file, log = launch_server(
                model, tmp_path / "servers", "--port", str(first.port), name="first-again"
            )
            restarted = wait_serving(process, port_file, log, timeout=WAIT)
            assert restarted.port == first.port
            _until(lambda: teacher.stats()["healthy_replicas"] == 2, "the client to see the restarted replica serving")
            for i in range(4):
                teacher.score(*_batch(i), request)
            again = teacher.stats()
            assert again[f"calls/{first.address}"] > after[f"calls/{first.address}"]  # back in the rotation
    finally:
        stop_servers([s for s in (second, restarted) if s is not None])


def _distill(tmp: Path, overrides: list[str]) -> list[dict]:
    path = write_job(tmp, steps=STEPS)
    job = Job(load_config(path, overrides, registry=REGISTRY), REGISTRY)
    job.prepare_run_dir()
    job.distill(None)
    return [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]


def test_a_run_survives_a_replica_killed_mid_run_without_losing_or_repeating_a_batch(tmp_path):
    teacher_dir = save_tiny_teacher(tmp_path / "teacher", hidden_size=32, layers=1)
    local = _distill(tmp_path / "local", [f"teacher.model={teacher_dir}"])
    first, second = start_servers([(teacher_dir, (), "first"), (teacher_dir, (), "second")], tmp_path / "servers")
    metrics = tmp_path / "remote" / "run" / "metrics.jsonl"
    killed_at: list[int] = []
    stop = threading.Event()

    def kill_after_step_k() -> None:
        # Watches the run's own log: the kill lands mid-run however fast or slow the machine is.
        while not stop.is_set():
            steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()] if metrics.exists() else []
            if steps and steps[-1] >= KILL_AFTER_STEP:
                _kill(first)
                killed_at.append(steps[-1])
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_after_step_k, daemon=True)
    watcher.start()
    try:
        remote = _distill(
            tmp_path / "remote",
            [
                f'teacher.address=["{first.address}", "{second.address}"]',
                'teacher.config=""',
                "teacher.wire_dtype=float32",
                f"teacher.cache_dir={tmp_path / 'cache'}",
            ],
        )
    finally:
        stop.set()
        watcher.join(30)
        stop_servers([first, second])
    assert killed_at and killed_at[0] < STEPS, "the replica was not killed before the run ended"
    assert [r["step"] for r in remote] == list(range(1, STEPS + 1))  # every step exactly once
    # Same losses as the in-process teacher at every step, before and after the crash: each batch got its
    # full signal once (a lost, repeated or zero-filled batch would change the curve from there on).
    for a, b in zip(local, remote):
        for key in ("train/loss", "train/ce", "train/kd_teacher_space", "train/projector_ce"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])
    first_line, last = remote[0], remote[-1]
    assert first_line["teacher/failovers"] == 0 and first_line["teacher/healthy_replicas"] == 2
    assert last["teacher/failovers"] >= 1 and last["teacher/healthy_replicas"] == 1
    assert last[f"teacher/calls/{first.address}"] > 0  # it served before it died
    served_after = last[f"teacher/calls/{second.address}"] - remote[killed_at[0] - 1][f"teacher/calls/{second.address}"]
    # The survivor answered every later batch (one may have been answered by the victim between the log line
    # the watcher saw and the kill).
    assert served_after >= STEPS - killed_at[0] - 1
