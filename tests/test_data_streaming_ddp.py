"""`data.streaming` with two data-parallel processes (DDP over gloo, launched by accelerate): each rank reads its
own part of the stream, and when one rank's part runs out first, both stop at the same step with one line and a
checkpoint of every rank's position, instead of one waiting forever in a collective."""

from __future__ import annotations

import subprocess

import pytest
import torch
from test_scale_ddp import _accelerate, _env
from tiny_job import write_job

TIMEOUT = 600  # generous for a loaded 2-core machine; a hang would end here, not in CI's global limit


@pytest.mark.integration
def test_two_ranks_whose_parts_end_at_different_batches_stop_together_with_one_line(tmp_path):
    # 23 records, every other one per rank: rank 0 gets 12 (6 batches of 2), rank 1 gets 11 (5 batches).
    job = write_job(tmp_path, samples=23)
    overrides = ["train.batch_size=2", "train.max_steps=10", "train.save_every=2", "data.streaming=true"]
    cmd = _accelerate(2, "--multi_gpu", "-m", "dskd", "run", str(job), *[a for o in overrides for a in ("--set", o)])
    done = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=TIMEOUT, check=False)
    errors = [line for line in done.stderr.splitlines() if line.startswith("dskd: error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert "ended after 5 batches of 2 (10 samples, this process's part of 2)" in errors[0]
    assert "step 5 is checkpointed" in errors[0]
    root = tmp_path / "run" / "checkpoints" / "distill"
    positions = [torch.load(part / "step-00000005" / "data.pt", weights_only=False) for part in (root, root / "rank-1")]
    assert [p["rank"] for p in positions] == [0, 1] and all(p["batches"] == 5 for p in positions)
    assert all(p["world_size"] == 2 and p["kind"] == "stream" for p in positions)
