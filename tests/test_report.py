"""`write_report`: plots and summary of a synthetic run directory."""

import json
import math

import pytest

from dskd.errors import DskdError
from dskd.evaluation.report import load_metrics, series, write_report

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
