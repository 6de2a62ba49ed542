"""Bad input discovered at setup or while reading data: one line on stderr, exit status 2, nothing written over."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_job import TOKENIZERS, write_job


def run(path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dskd", "run", str(path), *(a for o in overrides for a in ("--set", o))]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("dskd: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


@pytest.mark.integration
def test_kd_between_different_vocabularies_is_refused_at_setup_naming_the_cross_tokenizer_objectives(tmp_path):
    path = write_job(tmp_path)
    result = run(path, "objective.name=kd", f"teacher.tokenizer={TOKENIZERS / 'mistral'}")
    line = one_line_error(result)
    assert "kd" in line and "dskd_v2" in line and "eta" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.integration
def test_a_response_longer_than_the_maximum_length_names_the_sample_and_the_fix(tmp_path):
    path = write_job(tmp_path)
    train = tmp_path / "train.jsonl"
    lines = train.read_text().splitlines()
    lines[5] = json.dumps({"instruction": "Count.", "context": "", "response": " ".join(["one"] * 400)})
    train.write_text("\n".join(lines) + "\n")
    line = one_line_error(run(path))
    assert "max_length" in line and "5" in line


@pytest.mark.integration
def test_an_empty_training_split_is_one_line(tmp_path):
    path = write_job(tmp_path)
    (tmp_path / "train.jsonl").write_text("")
    line = one_line_error(run(path))
    assert "data.train" in line and "empty" in line


@pytest.mark.integration
def test_an_unknown_objective_lists_the_known_ones(tmp_path):
    path = write_job(tmp_path)
    line = one_line_error(run(path, "objective.name=dskd_v3"))
    assert "dskd_v3" in line and "dskd_v2" in line and "sft" in line


@pytest.mark.integration
def test_a_failed_run_leaves_an_earlier_final_model_untouched(tmp_path):
    path = write_job(tmp_path, steps=1)
    assert run(path).returncode == 0
    final = tmp_path / "run" / "final"
    before = {p.name: p.stat().st_mtime_ns for p in final.iterdir()}
    line = one_line_error(run(path, "train.max_steps=2"))  # the run directory holds a run: refused, nothing touched
    assert "--resume" in line
    assert {p.name: p.stat().st_mtime_ns for p in final.iterdir()} == before


@pytest.mark.integration
def test_dskd_eval_scores_a_saved_model_and_writes_json(tmp_path):
    path = write_job(tmp_path, steps=1)
    assert run(path).returncode == 0
    out = tmp_path / "metrics.json"
    final = str(tmp_path / "run" / "final")
    # The model measured against itself as its teacher: full agreement, no divergence.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dskd",
            "eval",
            "--config",
            str(path),
            "--model",
            final,
            "--teacher",
            final,
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads(out.read_text())
    assert metrics["num_examples"] == 4 and 0 <= metrics["rougeL"] <= 100 and 0 <= metrics["exact_match"] <= 100
    assert metrics["teacher_agreement"] == 100.0 and abs(metrics["teacher_kl"]) < 1e-5
    missing = subprocess.run(
        [sys.executable, "-m", "dskd", "eval", "--config", str(path), "--model", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "model" in one_line_error(missing)
