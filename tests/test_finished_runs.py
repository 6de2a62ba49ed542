"""A finished run is read-only: `--resume` with the same config does nothing and says so, with another config it is
refused naming the keys that differ; and a run whose every checkpoint is corrupt is never restarted at step 0 on top
of its old metrics."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_job import write_job

from dskd.run import checkpoint

pytestmark = pytest.mark.integration
WAIT = 600.0  # seconds: generous for a loaded 2-core machine


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}


def _dskd(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dskd", "run", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )


def _snapshot(run_dir: Path) -> dict[str, str]:
    """Every file of the run (cache aside) with its content's hash and modification time."""
    out = {}
    for path in sorted(run_dir.rglob("*")):
        if path.is_file() and "cache" not in path.relative_to(run_dir).parts:
            out[str(path.relative_to(run_dir))] = (
                f"{hashlib.sha256(path.read_bytes()).hexdigest()} {path.stat().st_mtime_ns}"
            )
    return out


def _errors(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("dskd: error:")]


def _finished_run(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    job = write_job(tmp_path, stages=("distill", "eval"), steps=2)
    first = _dskd(tmp_path, str(job), "--set", "train.save_every=1")
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "run"
    assert (run_dir / "final" / "config.json").exists() and (run_dir / "results.json").exists()
    return job, run_dir, _snapshot(run_dir)


def test_resuming_a_finished_run_with_another_config_is_refused_and_touches_nothing(tmp_path):
    job, run_dir, before = _finished_run(tmp_path)
    extended = _dskd(tmp_path, str(job), "--set", "train.save_every=1", "--set", "train.max_steps=3", "--resume")
    assert extended.returncode == 2, extended.stderr[-3000:]
    errors = _errors(extended)
    assert len(errors) == 1, extended.stderr[-3000:]
    # Names what differs (and only that) and where to run it instead.
    assert "finished" in errors[0] and "train.max_steps" in errors[0] and "run.output_dir" in errors[0], errors[0]
    assert "train.save_every" not in errors[0]
    assert _snapshot(run_dir) == before


def test_resuming_a_finished_run_unchanged_does_nothing_and_says_so(tmp_path):
    job, run_dir, before = _finished_run(tmp_path / "first")
    # The job folder moved with its run (its data and model paths resolve elsewhere now): still the same run.
    (tmp_path / "first").rename(tmp_path / "moved")
    job, run_dir = tmp_path / "moved" / job.name, tmp_path / "moved" / "run"
    again = _dskd(tmp_path / "moved", str(job), "--set", "train.save_every=1", "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to do" in again.stdout, again.stdout[-3000:]
    # No checkpoint (rng.pt), weight, metric line (a second eval line) or result rewritten.
    assert _snapshot(run_dir) == before


def test_resume_stops_when_every_checkpoint_is_corrupt_instead_of_restarting_at_step_zero(tmp_path):
    job = write_job(tmp_path, steps=3)
    first = _dskd(tmp_path, str(job), "--set", "train.save_every=1")
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "run"
    # As if the run had died before its end, and the disk then damaged every checkpoint it kept.
    shutil.rmtree(run_dir / "final")
    (run_dir / "finished.json").unlink(missing_ok=True)
    saved = checkpoint.checkpoints(run_dir / "checkpoints" / "distill")
    assert len(saved) == 2
    for path in saved:
        (path / "model.pt").write_bytes(b"bit rot")
    metrics = (run_dir / "metrics.jsonl").read_text()

    resumed = _dskd(tmp_path, str(job), "--set", "train.save_every=1", "--resume")
    assert resumed.returncode == 2, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    errors = _errors(resumed)
    assert len(errors) == 1 and "every checkpoint" in errors[0] and "unusable" in errors[0], resumed.stderr[-3000:]
    assert "run.output_dir" in errors[0]
    warnings = [line for line in resumed.stderr.splitlines() if line.startswith("warning:")]
    assert all(any(path.name in line for line in warnings) for path in saved), resumed.stderr[-3000:]
    assert (run_dir / "metrics.jsonl").read_text() == metrics  # the old metrics are left as they were
    assert not (run_dir / "final").exists()
