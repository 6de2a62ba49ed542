"""`dskd run` with [[teachers]]: both teachers fine-tuned on their routes, saved by name and distilled from; a
finished run compared entry by entry; every refusal one line with exit status 2 before training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from multi_teacher_job import write_multi_job


def run(path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dskd", "run", str(path), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def with_sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("dskd: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


@pytest.mark.integration
def test_a_two_teacher_job_fine_tunes_each_teacher_on_its_route_and_distils_from_both(tmp_path):
    path = write_multi_job(tmp_path, stages=("teacher_sft", "distill"), steps=2, samples=24)
    path.write_text(path.read_text() + "\n[teacher_sft]\nsteps = 2\nbatch_size = 4\n")
    done = run(path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "run"
    for name in ("mistral", "tinyllama"):
        assert (out / "teachers" / name / "config.json").exists()
        assert (out / "checkpoints" / f"teacher_sft-{name}").is_dir()
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    arithmetic = sum(r["category"].startswith("arithmetic/") for r in rows)
    assert 0 < arithmetic < len(rows) == 24
    assert f"teacher 'mistral' on {arithmetic} of 24 samples" in done.stdout.replace("\n", " ")
    assert f"teacher 'tinyllama' on {24 - arithmetic} of 24 samples" in done.stdout.replace("\n", " ")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stages = [r["stage"] for r in lines]
    assert stages == ["teacher_sft-mistral"] * 2 + ["teacher_sft-tinyllama"] * 2 + ["distill"] * 2
    distill = {k for r in lines if r["stage"] == "distill" for k in r}
    for name in ("mistral", "tinyllama"):
        assert {f"train/projector_ce/{name}", f"train/align_ratio/{name}", f"perf/teacher_wait_s/{name}"} <= distill
    config = json.loads((out / "config.json").read_text())
    assert [e["name"] for e in config["teachers"]] == ["mistral", "tinyllama"]

    assert run(path, "--resume").returncode == 0  # finished, same config: nothing to do
    line = one_line_error(run(path, "--resume", *with_sets("teachers.tinyllama.weight=2")))
    assert "teachers.tinyllama.weight (1.0 -> 2.0)" in line


@pytest.mark.integration
@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["teachers.mistral.weight=-1"], "teachers.mistral.weight: must be >= 0"),
        (["objective.name=sft"], "objective 'sft' uses no teacher"),
        (["policy.name=on_policy"], "policy 'on_policy' works with one teacher only"),
        (["data.streaming=true"], "data.streaming with [[teachers]]"),
    ],
)
def test_refusals_are_one_line_before_training(tmp_path, overrides, expected):
    path = write_multi_job(tmp_path)
    line = one_line_error(run(path, *with_sets(*overrides)))
    assert expected in line
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.integration
def test_conversations_are_rendered_by_each_teachers_own_chat_template(tmp_path):
    from multi_teacher_job import TOKENIZERS, two_teachers

    chat = Path(__file__).resolve().parents[1] / "examples" / "chat"
    lines = (chat / "data" / "train.jsonl").read_text().splitlines()[:16]
    teachers = two_teachers(routed=False)
    for entry, name in zip(teachers, ("mistral", "tinyllama")):
        entry["chat_template"] = str(TOKENIZERS / name / "chat_template.jinja")
    path = write_multi_job(tmp_path, teachers, steps=2)
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n")
    done = run(
        path,
        *with_sets(
            "data.train=chat.jsonl",
            f"student.chat_template={chat / 'chatml.jinja'}",
            "data.max_length=192",
        ),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("train/projector_ce/mistral" in r and "train/projector_ce/tinyllama" in r for r in lines)
