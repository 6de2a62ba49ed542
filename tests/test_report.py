"""`write_report`: plots and summary of a synthetic run directory."""

import json
import math

import pytest

from dskd.errors import DskdError
from dskd.evaluation.report import (
    _plot_agreement,
    _plot_alignment,
    _plot_eval,
    _plot_losses,
    _plot_teachers,
    load_metrics,
    series,
    split_teacher,
    teacher_names,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def train_line(stage: str, step: int, **terms) -> dict:
    line = {"stage": stage, "step": step, "train/lr": 1e-4 * (1 - step / 100), "perf/tokens_per_s": 1000.0 + step}
    line.update({f"train/{k}": v for k, v in terms.items()})
    line["train/loss"] = sum(terms.values())
    return line


def full_run_lines() -> list[dict]:
    lines = [train_line("teacher_sft", s, ce=3.0 - 0.1 * s) for s in range(1, 6)]
    for step in range(10, 101, 10):
        decay = math.exp(-step / 50)
        line = train_line(
            "distill", step,
            ce=2.0 * decay + 1.0, kd_student_space=decay, kd_teacher_space=0.8 * decay, projector_ce=0.5 * decay,
        )  # fmt: skip
        line["train/align_ratio"] = 0.9 + 0.0005 * step
        line["train/t2s_agreement"] = 20.0 + 0.3 * step
        lines.append(line)
        if step % 50 == 0:
            lines.append(
                {"stage": "eval", "step": step, "eval/rougeL": 10.0 + step / 10, "eval/exact_match": step / 50,
                 "eval/teacher_agreement": 25.0 + step / 5, "eval/teacher_kl": 2.0 - step / 100}
            )  # fmt: skip
    return lines


RESULTS = {
    "teacher": {"exact_match": 4.5, "rougeL": 26.789},
    "student_init": {"exact_match": 0.0, "rougeL": 8.25},
    "student": {"exact_match": 2.0, "rougeL": 21.5, "teacher_agreement": 45.0, "teacher_kl": 0.8125},
}


def make_run(tmp_path, lines, results=RESULTS, tail: str = ""):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + tail)
    if results is not None:
        (run / "results.json").write_text(json.dumps(results))
    return run


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 1024


def test_a_full_run_gets_every_plot_and_a_summary(tmp_path):
    run = make_run(tmp_path, full_run_lines())
    written = write_report(run)
    names = [p.name for p in written]
    assert names == ["losses.png", "eval.png", "alignment.png", "agreement.png", "summary.md"]
    for path in written:
        assert path.parent == run / "report"
    for path in written[:-1]:
        assert_png(path)


def test_summary_holds_the_results_table_and_the_final_metrics(tmp_path):
    run = make_run(tmp_path, full_run_lines())
    summary = write_report(run)[-1].read_text()
    assert "| model | exact_match | rougeL | teacher_agreement | teacher_kl |" in summary
    assert "| teacher | 4.50 | 26.79 | – | – |" in summary
    assert "| student_init | 0.00 | 8.25 | – | – |" in summary
    assert "| student | 2.00 | 21.50 | 45.00 | 0.8125 |" in summary
    # The last logged value of each metric, with its step: eval at step 100, distill losses at step 100.
    assert "| eval | eval/rougeL | 20.00 | 100 |" in summary
    assert "| eval | eval/teacher_kl | 1.00 | 100 |" in summary
    assert f"| distill | train/kd_student_space | {math.exp(-2):.4g} | 100 |" in summary
    assert "| teacher_sft | train/ce | 2.50 | 5 |" in summary
    assert "![losses](losses.png)" in summary


def test_plots_without_data_are_skipped_but_the_loss_plot_is_always_written(tmp_path):
    lines = [train_line("distill", s, ce=1.0 / s, kd=2.0 / s) for s in range(1, 8)]
    written = write_report(make_run(tmp_path, lines, results=None))
    assert [p.name for p in written] == ["losses.png", "summary.md"]
    assert_png(written[0])
    assert "No results.json yet" in written[1].read_text()


def test_series_are_per_stage_and_skip_lines_without_the_metric():
    records = full_run_lines()
    ce = {s.stage: s for s in series(records, "train/ce")}
    assert list(ce) == ["teacher_sft", "distill"]
    assert ce["teacher_sft"].steps == (1, 2, 3, 4, 5)
    assert ce["distill"].values[0] == pytest.approx(2.0 * math.exp(-0.2) + 1.0)
    (rouge,) = series(records, "eval/rougeL")
    assert rouge.steps == (50, 100) and rouge.values == (15.0, 20.0)


def test_a_partial_last_line_of_a_live_run_is_ignored(tmp_path):
    lines = full_run_lines()
    run = make_run(tmp_path, lines, tail='{"stage": "distill", "step": 110, "train/lo')
    assert len(load_metrics(run / "metrics.jsonl")) == len(lines)
    assert (run / "report" / "losses.png").exists() is False
    write_report(run)
    assert_png(run / "report" / "losses.png")


def test_a_malformed_line_inside_the_file_is_an_error_naming_the_line(tmp_path):
    run = make_run(tmp_path, [])
    good = json.dumps(train_line("distill", 1, ce=1.0))
    (run / "metrics.jsonl").write_text(f"{good}\nnot json\n{good}\n")
    with pytest.raises(DskdError, match=r"metrics.jsonl:2 is not a JSON object"):
        write_report(run)


def test_a_missing_run_dir_or_metrics_file_is_a_one_line_error(tmp_path):
    with pytest.raises(DskdError, match="does not exist") as missing_dir:
        write_report(tmp_path / "nowhere")
    assert "\n" not in str(missing_dir.value)
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(DskdError, match="metrics.jsonl not found") as missing_file:
        write_report(tmp_path / "empty_run")
    assert "\n" not in str(missing_file.value)
    (tmp_path / "empty_run" / "metrics.jsonl").write_text("")
    with pytest.raises(DskdError, match="is empty"):
        write_report(tmp_path / "empty_run")


def test_a_corrupt_results_file_is_an_error(tmp_path):
    run = make_run(tmp_path, full_run_lines(), results=None)
    (run / "results.json").write_text("{truncated")
    with pytest.raises(DskdError, match="results.json is not valid JSON"):
        write_report(run)


# -- several teachers ------------------------------------------------------------------------------------------
TEACHERS = ("lists", "numbers_words")


def multi_teacher_lines() -> list[dict]:
    """A run with two teachers as `dskd run` logs it: a teacher_sft stage per teacher, then distill with each
    teacher's terms, align ratio, agreement and wait under `<key>/<name>`, then the eval line."""
    lines = [train_line(f"teacher_sft-{name}", s, ce=3.0 - 0.1 * s) for name in TEACHERS for s in range(1, 4)]
    for step in range(10, 41, 10):
        line = train_line("distill", step, ce=2.0 - step / 100)
        for i, name in enumerate(TEACHERS):
            line[f"train/kd_student_space/{name}"] = 1.0 + i - step / 100
            line[f"train/kd_teacher_space/{name}"] = 0.5 + i - step / 200
            line[f"train/align_ratio/{name}"] = 0.8 + 0.1 * i
            line[f"train/t2s_agreement/{name}"] = 30.0 + 10 * i + step / 10
            line[f"perf/teacher_wait_s/{name}"] = 0.01
            line["teacher/calls/" + name] = step  # a remote teacher's counter: no teacher of its own
        line["train/loss"] = line["train/ce"] + sum(v for k, v in line.items() if k.startswith("train/kd_"))
        lines.append(line)
    eval_line = {"stage": "eval", "step": 40, "eval/rougeL": 30.0, "eval/exact_match": 20.0}
    for i, name in enumerate(TEACHERS):
        eval_line.update({f"eval/rougeL/{name}": 25.0 + 10 * i, f"eval/exact_match/{name}": 15.0 + 10 * i})
        eval_line.update({f"eval/teacher_agreement/{name}": 40.0 + i, f"eval/teacher_kl/{name}": 1.5 - i / 2})
    return lines + [eval_line]


MULTI_RESULTS = {
    "teacher/lists": {"exact_match": 50.0, "rougeL": 70.0, "num_examples": 106},
    "teacher/numbers_words": {"exact_match": 30.0, "rougeL": 55.0, "num_examples": 94},
    "student_init": {"exact_match": 0.0, "rougeL": 5.0, "teacher_agreement/lists": 1.0, "teacher_kl/lists": 9.0},
    "student": {
        "exact_match": 20.0,
        "rougeL": 30.0,
        "exact_match/lists": 15.0,
        "rougeL/lists": 25.0,
        "teacher_agreement/lists": 40.0,
        "teacher_kl/lists": 1.5,
        "teacher_agreement/numbers_words": 41.0,
        "teacher_kl/numbers_words": 1.0,
    },
}


def _labels(figure) -> list[list[str]]:
    return [[line.get_label() for line in ax.get_lines()] for ax in figure.axes]


def test_teacher_names_come_from_per_teacher_metrics_and_result_rows_never_from_counters():
    assert teacher_names(multi_teacher_lines()) == list(TEACHERS)
    assert teacher_names([], MULTI_RESULTS) == list(TEACHERS)
    assert teacher_names(full_run_lines(), RESULTS) == []
    assert split_teacher("train/kd_student_space/lists", list(TEACHERS)) == ("train/kd_student_space", "lists")
    assert split_teacher("train/loss", list(TEACHERS)) == ("train/loss", "")


def test_a_multi_teacher_run_plots_each_teachers_terms_alignment_and_agreement(tmp_path):
    run = make_run(tmp_path, multi_teacher_lines(), MULTI_RESULTS)
    written = write_report(run)
    assert [p.name for p in written] == [
        "losses.png", "eval.png", "alignment.png", "agreement.png", "teachers.png", "summary.md",
    ]  # fmt: skip
    for path in written[:-1]:
        assert_png(path)
    records, names = multi_teacher_lines(), list(TEACHERS)
    losses = _plot_losses(records, names)
    # One panel per stage (a teacher_sft stage per teacher); a teacher's own terms are not in losses.png ...
    assert [ax.get_title() for ax in losses.axes] == [
        "training losses (teacher_sft-lists)", "training losses (teacher_sft-numbers_words)", "training losses (distill)",
    ]  # fmt: skip
    assert sorted(_labels(losses)[-1]) == ["ce", "loss"]
    # ... but in its panel of teachers.png.
    teachers = _plot_teachers(records, names)
    assert [ax.get_title() for ax in teachers.axes] == [f"teacher {n}: distillation terms" for n in TEACHERS]
    assert _labels(teachers) == [["kd_student_space", "kd_teacher_space"]] * 2
    assert _labels(_plot_alignment(records, names)) == [[f"teacher {n}" for n in TEACHERS]]
    agreement = _labels(_plot_agreement(records, names))
    assert agreement[0] == [f"training, teacher {n}" for n in TEACHERS] + [f"held-out, teacher {n}" for n in TEACHERS]
    assert agreement[1] == [f"teacher {n}" for n in TEACHERS]
    evaluation = _labels(_plot_eval(records, names))
    assert evaluation[0] == ["all samples (eval)"] + [f"teacher {n} (eval)" for n in TEACHERS]


def test_a_multi_teacher_summary_has_a_row_per_teacher_and_a_table_per_teacher(tmp_path):
    summary = write_report(make_run(tmp_path, multi_teacher_lines(), MULTI_RESULTS))[-1].read_text()
    assert "| model | exact_match | rougeL | num_examples |" in summary  # per-teacher keys are not columns here
    assert (
        summary.index("| teacher/lists |") < summary.index("| teacher/numbers_words |") < summary.index("| student |")
    )
    assert "### Per teacher" in summary
    # student_init's scores on a teacher's samples were not measured (–); the student's were.
    assert "| lists | 106 | 50.00 | 70.00 | – | – | 1.00 | 9.00 | 15.00 | 25.00 | 40.00 | 1.50 |" in summary
    assert "| numbers_words | 94 | 30.00 | 55.00 | – | – | – | – | – | – | 41.00 | 1.00 |" in summary
