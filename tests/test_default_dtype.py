"""One default compute dtype for every teacher (float32 on CPU, bfloat16 on CUDA), printed at start: by default
a teacher server and the same teacher in process give the same losses (issue 11, item 7)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from teacher_server_harness import REPO, SERVE_SCRIPT, events, save_tiny_teacher, stop_servers, wait_serving
from tiny_job import write_job

from dskd.config import load_config
from dskd.models.loading import default_dtype
from dskd.registry import load_registry
from dskd.run.job import Job

REGISTRY = load_registry()


def test_the_default_rule_is_float32_on_cpu_and_bfloat16_on_cuda(tmp_path):
    assert default_dtype(torch.device("cpu")) == "float32"
    assert default_dtype(torch.device("cuda", 0)) == "bfloat16"
    assert load_config(write_job(tmp_path)).teacher.dtype == "auto"


def _losses(tmp, overrides, capsys) -> tuple[list[dict], str]:
    path = write_job(tmp, steps=2)
    job = Job(load_config(path, overrides, registry=REGISTRY), REGISTRY)
    job.prepare_run_dir()
    job.distill(None)
    out = capsys.readouterr()
    return [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()], out.out + out.err


def _signal(config):
    from dskd.run.components import build_teacher
    from dskd.types import SignalRequest

    teacher = build_teacher(config, torch.device("cpu"))
    try:
        ids = torch.tensor([[1, 450, 4996, 17354, 1701, 29916]])
        rows = torch.arange(ids.numel())
        return teacher.score(ids, torch.ones_like(ids), rows, SignalRequest(hidden_states=True, top_k=8))
    finally:
        teacher.close()


@pytest.mark.integration
def test_a_default_remote_teacher_gives_the_loss_of_the_default_local_teacher_on_cpu(tmp_path, capsys):
    teacher_dir = save_tiny_teacher(tmp_path / "teacher", hidden_size=32, layers=1)
    local, said = _losses(tmp_path / "local", [f"teacher.model={teacher_dir}"], capsys)
    local_signal = _signal(load_config(tmp_path / "local" / "job.toml", [f"teacher.model={teacher_dir}"]))
    assert "teacher dtype float32" in said
    # No --dtype: the server's own default.
    port_file, log_path = tmp_path / "server.port", tmp_path / "server.log"
    cmd = [
        sys.executable,
        str(SERVE_SCRIPT),
        "--model",
        str(teacher_dir),
        "--port",
        "0",
        "--port-file",
        str(port_file),
        "--device",
        "cpu",
        "--max-batch-tokens",
        "2048",
        "--max-seq-len",
        "256",
        "--drain-seconds",
        "0.2",
    ]
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
    server = wait_serving(process, port_file, log_path)
    try:
        listening = next(e for e in events(server) if e["event"] == "listening")
        assert listening["dtype"] == "float32", listening
        remote, said = _losses(
            tmp_path / "remote",
            [
                f'teacher.address=["{server.address}"]',
                'teacher.config=""',
                "teacher.wire_dtype=float32",
                f"teacher.cache_dir={tmp_path / 'cache'}",
            ],
            capsys,
        )
        assert "teacher dtype float32" in said
        remote_signal = _signal(
            load_config(
                tmp_path / "remote" / "job.toml",
                [
                    f'teacher.address=["{server.address}"]',
                    'teacher.config=""',
                    "teacher.wire_dtype=float32",
                    f"teacher.cache_dir={tmp_path / 'cache'}",
                ],
            )
        )
    finally:
        stop_servers([server])
    # The losses above barely feel a random teacher's near-uniform distribution; its hidden states do.
    assert remote_signal.hidden_states.dtype == local_signal.hidden_states.dtype == torch.float32
    torch.testing.assert_close(remote_signal.hidden_states, local_signal.hidden_states, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(remote_signal.topk_logprobs, local_signal.topk_logprobs, rtol=1e-5, atol=1e-5)
    for a, b in zip(local, remote, strict=True):
        for key in ("train/loss", "train/kd_teacher_space"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])
