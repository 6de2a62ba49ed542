"""A teacher outage does not cost the run: with its only server killed mid-run and restarted within
`teacher.retry_timeout_s` the run waits and goes on; gone for longer, the run checkpoints the last completed step,
exits 2 naming `--resume`, and `--resume` then finishes it with every step logged once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from teacher_server_harness import (
    ServerProcess,
    launch_server,
    save_tiny_teacher,
    start_servers,
    stop_servers,
    wait_serving,
)
from tiny_job import write_job

from dskd.run import checkpoint

pytestmark = pytest.mark.integration
STEPS = 10
KILL_AFTER_STEP = 3
WAIT = 300.0  # seconds: generous for a loaded 2-core machine


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}


def _steps(metrics: Path) -> list[int]:
    if not metrics.exists():
        return []
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip().endswith("}")]


def _kill(server: ServerProcess) -> None:
    server.process.kill()  # SIGKILL: no drain; connections simply break
    server.process.wait(30)


def _command(job: Path, address: str, cache: Path, retry_timeout_s: float, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dskd",
        "run",
        str(job),
        "--set",
        f'teacher.address=["{address}"]',
        "--set",
        'teacher.config=""',
        "--set",
        "teacher.wire_dtype=float32",
        "--set",
        f"teacher.cache_dir={cache}",
        "--set",
        f"teacher.retry_timeout_s={retry_timeout_s}",
        *extra,
    ]


def _kill_after(metrics: Path, server: ServerProcess, process: subprocess.Popen) -> int:
    """Kill `server` once the run has logged step KILL_AFTER_STEP; the step it had reached."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and process.poll() is None:
        steps = _steps(metrics)
        if steps and steps[-1] >= KILL_AFTER_STEP:
            _kill(server)
            return steps[-1]
        time.sleep(0.02)
    raise AssertionError(f"the run ended or stalled before step {KILL_AFTER_STEP}")


def test_a_run_waits_for_its_only_teacher_to_be_restarted_and_goes_on(tmp_path):
    teacher_dir = save_tiny_teacher(tmp_path / "teacher", hidden_size=32, layers=1)
    (server,) = start_servers([(teacher_dir, (), "only")], tmp_path / "servers")
    job = write_job(tmp_path / "job", steps=STEPS)
    metrics = tmp_path / "job" / "run" / "metrics.jsonl"
    log = (tmp_path / "run.log").open("w")
    process = subprocess.Popen(
        _command(job, server.address, tmp_path / "cache", 120),
        cwd=tmp_path / "job",
        env=_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    restarted = None
    try:
        killed_at = _kill_after(metrics, server, process)
        time.sleep(2.0)  # down for a while: far longer than the three attempts (0.6 s) the client used to make
        assert process.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
        new, port_file, server_log = launch_server(
            teacher_dir, tmp_path / "servers", "--port", str(server.port), name="again"
        )
        restarted = wait_serving(new, port_file, server_log, timeout=WAIT)
        assert process.wait(WAIT) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
        stop_servers([s for s in (server, restarted) if s is not None])
    output = (tmp_path / "run.log").read_text()
    assert killed_at < STEPS
    assert _steps(metrics) == list(range(1, STEPS + 1))  # every step once: nothing lost, nothing repeated
    assert "no replica answers" in output and "retry_timeout_s" in output  # it said it was waiting
    assert (tmp_path / "job" / "run" / "final" / "config.json").exists()


def test_an_outage_longer_than_retry_timeout_checkpoints_exits_2_naming_resume_and_resume_finishes(tmp_path):
    teacher_dir = save_tiny_teacher(tmp_path / "teacher", hidden_size=32, layers=1)
    (server,) = start_servers([(teacher_dir, (), "only")], tmp_path / "servers")
    job = write_job(tmp_path / "job", steps=STEPS)  # default checkpointing: nothing periodic within a few seconds
    run_dir = tmp_path / "job" / "run"
    command = _command(job, server.address, tmp_path / "cache", 2)
    process = subprocess.Popen(
        command, cwd=tmp_path / "job", env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    restarted = None
    try:
        killed_at = _kill_after(run_dir / "metrics.jsonl", server, process)
        stdout, stderr = process.communicate(timeout=WAIT)
        assert process.returncode == 2, stdout[-2000:] + stderr[-3000:]
        errors = [line for line in stderr.splitlines() if line.startswith("dskd: error:")]
        assert len(errors) == 1, stderr[-3000:]
        assert server.address in errors[0] and "checkpointed" in errors[0] and "--resume" in errors[0], errors[0]
        saved = checkpoint.latest(run_dir / "checkpoints" / "distill", warn=lambda _: None)
        assert saved is not None and killed_at <= saved.manifest["step"] < STEPS
        assert f"step {saved.manifest['step']} is checkpointed" in errors[0]
        assert not (run_dir / "final").exists()

        new, port_file, server_log = launch_server(
            teacher_dir, tmp_path / "servers", "--port", str(server.port), name="again"
        )
        restarted = wait_serving(new, port_file, server_log, timeout=WAIT)
        resumed = subprocess.run(
            [*command, "--resume"],
            cwd=tmp_path / "job",
            env=_env(),
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=False,
        )
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"resumed from step-{saved.manifest['step']:08d}" in resumed.stdout
    finally:
        if process.poll() is None:
            process.kill()
        stop_servers([s for s in (server, restarted) if s is not None])
    assert _steps(run_dir / "metrics.jsonl") == list(range(1, STEPS + 1))
    assert (run_dir / "final" / "config.json").exists()


def test_a_client_started_before_its_server_waits_for_it_within_retry_timeout(tmp_path):
    """Starting a run while the teacher server still loads its model: the handshake is retried, not failed."""
    import socket
    import threading

    from dskd.errors import TeacherError
    from dskd.servers.client import RemoteTeacher

    model = save_tiny_teacher(tmp_path / "teacher")
    with socket.socket() as probe:  # a port nobody listens on yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"127.0.0.1:{port}"
    with pytest.raises(TeacherError):  # with no time to wait, the old answer: unreachable at once
        RemoteTeacher(address, cache_dir=tmp_path / "cache", retry_timeout_s=0.0)
    result: dict = {}

    def connect() -> None:
        try:
            result["teacher"] = RemoteTeacher(address, cache_dir=tmp_path / "cache", retry_timeout_s=WAIT)
        except Exception as error:  # reported below
            result["error"] = error

    client = threading.Thread(target=connect)
    client.start()
    time.sleep(2.0)  # the client is waiting now
    assert client.is_alive()
    server = wait_serving(*launch_server(model, tmp_path / "server", "--port", str(port)))
    try:
        client.join(WAIT)
        assert "error" not in result, result.get("error")
        with result["teacher"] as teacher:
            assert teacher.vocab_size > 0 and teacher.fingerprint
    finally:
        stop_servers([server])
