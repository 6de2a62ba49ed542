"""The eval stage and `dskd eval` with several teachers (issue 18): each teacher's generation metrics on the samples it
serves, and the students' agreement with and KL to each teacher there, under keys named for the teacher; one teacher
keeps the keys it always had.

The reference for every per-teacher number is an independent single-teacher evaluation: a job whose one [teacher] is
that entry and whose evaluation and held-out files hold only the samples the entry serves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from multi_teacher_job import ARITHMETIC, OTHERS, two_teachers, write_multi_job
from tiny_job import write_job

from dskd.config import load_config
from dskd.errors import DskdError
from dskd.evaluation.stage import evaluate_stage, parse_teacher_dirs
from dskd.registry import load_registry
from dskd.run.job import Job

REGISTRY = load_registry()
TASKS = Path(__file__).resolve().parents[1] / "examples" / "data" / "tasks"
GENERATION = ("exact_match", "rougeL", "avg_new_tokens", "num_examples")
ROUTES = {"mistral": ARITHMETIC, "tinyllama": OTHERS}


def _job(path: Path, overrides=()) -> Job:
    return Job(load_config(path, list(overrides), registry=REGISTRY), REGISTRY)


def _served_lines(split: str, n: int, patterns: list[str]) -> list[str]:
    import fnmatch

    lines = (TASKS / f"{split}.jsonl").read_text().splitlines()[:n]
    return [line for line in lines if any(fnmatch.fnmatch(json.loads(line)["category"], p) for p in patterns)]


def _single_teacher_reference(tmp: Path, name: str) -> dict:
    """The eval stage of a job whose one [teacher] is entry `name`, on only the samples that entry serves."""
    path = write_multi_job(tmp, stages=("eval",))
    entry = next(e for e in two_teachers() if e["name"] == name)
    # The same student, the same split sizes as write_job's (16 held-out, 8 test), filtered to the route.
    (tmp / "valid.jsonl").write_text("\n".join(_served_lines("valid", 16, ROUTES[name])) + "\n")
    (tmp / "test.jsonl").write_text("\n".join(_served_lines("test", 8, ROUTES[name])) + "\n")
    text = path.read_text()
    text = text[: text.index("[[teachers]]")]
    text += f'[teacher]\nconfig = "{entry["config"]}"\ntokenizer = "{entry["tokenizer"]}"\n'
    path.write_text(text.replace("max_samples = 4", "max_samples = 0"))
    return evaluate_stage(_job(path), None, None, include=("teacher", "student_init"))


@pytest.fixture(scope="module")
def two_teacher_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two")
    path = write_multi_job(tmp, stages=("eval",))
    # Eight test samples (eval.max_samples = 0), so each route has some: 2 arithmetic, 6 others.
    return evaluate_stage(_job(path, ["eval.max_samples=0"]), None, None, include=("teacher", "student_init"))


def test_each_teacher_is_a_row_of_its_own_scored_on_the_samples_it_serves(two_teacher_results):
    results = two_teacher_results
    assert list(results) == ["teacher/mistral", "teacher/tinyllama", "student_init"]
    assert results["teacher/mistral"]["num_examples"] == len(_served_lines("test", 8, ARITHMETIC)) == 2
    assert results["teacher/tinyllama"]["num_examples"] == len(_served_lines("test", 8, OTHERS)) == 6
    assert results["student_init"]["num_examples"] == 8
    assert "teacher_agreement" not in results["student_init"]  # no key without a teacher's name with several


@pytest.mark.parametrize("name", ["mistral", "tinyllama"])
def test_each_teachers_numbers_equal_a_single_teacher_evaluation_on_its_samples(two_teacher_results, tmp_path, name):
    reference = _single_teacher_reference(tmp_path, name)
    results = two_teacher_results
    assert {k: results[f"teacher/{name}"][k] for k in GENERATION} == {k: reference["teacher"][k] for k in GENERATION}
    student, alone = results["student_init"], reference["student_init"]
    assert student[f"teacher_agreement/{name}"] == pytest.approx(alone["teacher_agreement"], abs=1e-9)
    assert student[f"teacher_kl/{name}"] == pytest.approx(alone["teacher_kl"], rel=1e-5, abs=1e-9)
    # The student's scores on a routed teacher's samples come from its answers to the whole split.
    assert student[f"exact_match/{name}"] == pytest.approx(alone["exact_match"])
    assert student[f"rougeL/{name}"] == pytest.approx(alone["rougeL"])


def test_an_unrouted_teacher_is_compared_on_every_sample_and_gets_no_part_scores(tmp_path):
    path = write_multi_job(tmp_path, two_teachers(routed=False), stages=("eval",))
    results = evaluate_stage(_job(path), None, None, include=("teacher", "student_init"))
    assert results["teacher/mistral"]["num_examples"] == results["teacher/tinyllama"]["num_examples"] == 4
    student = results["student_init"]
    assert {"teacher_agreement/mistral", "teacher_kl/mistral", "teacher_agreement/tinyllama"} <= set(student)
    assert not any(k.startswith(("exact_match/", "rougeL/")) for k in student)


def test_one_teacher_keeps_the_keys_it_always_had(tmp_path):
    path = write_job(tmp_path, stages=("eval",))
    results = evaluate_stage(_job(path), None, None, include=("teacher", "student_init"))
    assert list(results) == ["teacher", "student_init"]
    assert set(results["student_init"]) == set(GENERATION) | {"teacher_agreement", "teacher_kl"}


def test_a_teacher_without_evaluation_samples_is_warned_about_and_the_others_are_measured(tmp_path, capsys):
    path = write_multi_job(tmp_path, stages=("eval",))
    # The first test sample is a conversion, which only the second teacher serves.
    results = evaluate_stage(_job(path, ["eval.max_samples=1"]), None, None, include=("teacher", "student_init"))
    assert list(results) == ["teacher/tinyllama", "student_init"]
    assert "exact_match/mistral" not in results["student_init"]
    assert "teacher_agreement/mistral" in results["student_init"]  # the held-out split has arithmetic samples
    err = capsys.readouterr().err
    assert "data.test has no sample that teacher 'mistral' serves" in err and "generation is not measured" in err


# -- dskd eval --teacher ------------------------------------------------------------------------------------------
def test_teacher_folders_are_named_by_teacher_or_bare_for_a_lone_teacher(tmp_path):
    several = load_config(write_multi_job(tmp_path / "two"), registry=REGISTRY)
    one = load_config(write_job(tmp_path / "one"), registry=REGISTRY)
    assert parse_teacher_dirs(["mistral=/m", "tinyllama=/t"], several) == {"mistral": "/m", "tinyllama": "/t"}
    assert parse_teacher_dirs([str(tmp_path)], one) == {"teacher": str(tmp_path)}
    assert parse_teacher_dirs([], several) == {}


@pytest.mark.parametrize(
    "values, message",
    [
        (["/some/dir"], "the job has 2 teachers (mistral, tinyllama); name the one this folder replaces"),
        (["gemma=/g"], "the job has no teacher named 'gemma'; its teachers: mistral, tinyllama"),
        (["mistral=/a", "mistral=/b"], "names teacher 'mistral' twice"),
        (["mistral="], "no folder after '='"),
    ],
)
def test_bad_teacher_folders_are_one_line_errors(tmp_path, values, message):
    config = load_config(write_multi_job(tmp_path), registry=REGISTRY)
    with pytest.raises(DskdError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_teacher_dirs(values, config)


def _dskd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dskd", *args], capture_output=True, text=True, timeout=900)


@pytest.mark.integration
def test_dskd_eval_reports_agreement_with_each_teacher_of_a_trained_two_teacher_job(tmp_path):
    path = write_multi_job(tmp_path, stages=("teacher_sft", "distill", "eval"), extra="", steps=2)
    text = path.read_text().replace("[eval]", "[teacher_sft]\nsteps = 2\nbatch_size = 4\n\n[eval]")
    path.write_text(text)
    done = _dskd("run", str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert {"teacher/mistral", "teacher/tinyllama", "student_init", "student"} <= set(results)
    for name in ("mistral", "tinyllama"):
        assert 0 <= results["student"][f"teacher_agreement/{name}"] <= 100
    # The job's teachers by default (the copies teacher_sft saved), or folders named on the command line; stdout
    # carries the metrics' JSON alone.
    final = str(run / "final")
    default = _dskd("eval", "--config", str(path), "--model", final)
    assert default.returncode == 0, default.stderr[-3000:]
    metrics = json.loads(default.stdout)
    for name in ("mistral", "tinyllama"):
        assert metrics[f"teacher_agreement/{name}"] == pytest.approx(results["student"][f"teacher_agreement/{name}"])
        assert metrics[f"teacher_kl/{name}"] == pytest.approx(results["student"][f"teacher_kl/{name}"], rel=1e-5)
    swapped = _dskd(
        "eval", "--config", str(path), "--model", final, "--teacher", f"mistral={run / 'teachers' / 'tinyllama'}"
    )
    assert swapped.returncode == 0, swapped.stderr[-3000:]
    replaced = json.loads(swapped.stdout)
    assert replaced["teacher_agreement/tinyllama"] == pytest.approx(metrics["teacher_agreement/tinyllama"])
    assert replaced["teacher_kl/mistral"] != pytest.approx(metrics["teacher_kl/mistral"], rel=1e-6)
    bad = _dskd("eval", "--config", str(path), "--model", final, "--teacher", str(run / "teachers" / "mistral"))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "name the one this folder replaces" in bad.stderr
