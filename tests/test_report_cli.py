"""`python -m dskd report RUN_DIR` on the run directory of a real (tiny) run writes non-empty PNG plots and a
summary, and prints their paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_job import write_job

from dskd.config import load_config
from dskd.registry import load_registry
from dskd.run.job import run_job

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_dskd_report_plots_a_finished_tiny_run(tmp_path):
    registry = load_registry()
    run_job(
        load_config(write_job(tmp_path, samples=16, steps=2, stages=("distill", "eval")), [], registry=registry),
        registry=registry,
    )
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "dskd", "report", str(run_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    printed = [Path(line) for line in done.stdout.splitlines() if line.strip()]
    names = [p.name for p in printed]
    assert names[0] == "losses.png" and "eval.png" in names and names[-1] == "summary.md", names
    for path in printed:
        assert path.parent == run_dir / "report" and path.is_file()
    for path in printed[:-1]:
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1024, path
    summary = printed[-1].read_text(encoding="utf-8")
    assert "![losses](losses.png)" in summary and "| student |" in summary
