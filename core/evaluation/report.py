"""`dskd report`: plots and a summary of a run directory, from its `metrics.jsonl` and `results.json`.

Writes into `<run_dir>/report/`:

- `losses.png`: every training loss term over steps, one panel per training stage (teacher SFT, distill);
- `eval.png`: the evaluation metrics (ROUGE-L, exact match, ...) over steps;
- `alignment.png`: the share of student tokens the aligner paired with a teacher token (cross-vocabulary runs);
- `agreement.png`: top-1 agreement with the teacher (training and held-out) and the held-out KL(teacher || student);
- `teachers.png` (a run with several teachers): one panel per teacher with its distillation terms;
- `summary.md`: the results table (teachers, initial student, distilled student), with several teachers a table
  per teacher (its own scores on the samples it serves, the students' scores, agreement and KL there), and the
  final value of every logged metric.

With several teachers (`[[teachers]]`), a metric of one teacher carries its name as a last path part
(`train/align_ratio/<name>`, `train/kd_student_space/<name>`, `eval/teacher_agreement/<name>`, ...): the alignment,
agreement and KL plots draw one line per teacher, and its distillation terms move from `losses.png` to its panel of
`teachers.png`.

A plot whose data the run did not log is skipped, so the report works on a run that is still going. Figures
are drawn on matplotlib's Agg canvas directly (no pyplot), so no display is needed and the caller's matplotlib
backend is left alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from dskd.errors import DskdError

METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
REPORT_DIR = "report"

# Logged under train/ but not loss terms: they get their own plots (or none).
NOT_LOSS_TERMS = frozenset(
    {"train/lr", "train/align_ratio", "train/t2s_agreement", "train/grad_norm", "train/tokens", "train/epoch"}
)
AGREEMENT_KEYS = ("train/t2s_agreement", "eval/teacher_agreement")
RESULT_ROWS = ("teacher", "student_init", "student")
RESULT_COLUMNS = ("exact_match", "rougeL", "teacher_agreement", "teacher_kl")
# Metrics logged once per teacher (`<key>/<name>`) with several teachers: where teacher names are read from.
PER_TEACHER_KEYS = (
    "train/align_ratio",
    "train/t2s_agreement",
    "perf/teacher_wait_s",
    "eval/teacher_agreement",
    "eval/teacher_kl",
)
TEACHER_ROW = "teacher/"
METRIC_FAMILIES = frozenset({"train", "eval", "perf", "data", "policy", "teacher"})


@dataclass(frozen=True)
class Series:
    """One metric of one stage over steps."""

    stage: str
    key: str
    steps: tuple[int, ...]
    values: tuple[float, ...]


def load_metrics(path: Path) -> list[dict]:
    """The records of a `metrics.jsonl`, in order.

    A malformed *last* line is dropped: the engine appends one line per log interval, so a run that is still
    writing, or was killed mid-write, leaves a partial final line that says nothing wrong about the run.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    records = []
    for position, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            if position == len(numbered) - 1:
                break
            raise DskdError(
                f"{path}:{number} is not a JSON object; metrics.jsonl holds one object per line, as `dskd run` writes it "
                f"(remove or fix that line)"
            ) from None
        records.append(record)
    return records


def series(records: list[dict], key: str) -> list[Series]:
    """`key`'s values over steps, one `Series` per stage that logged it (stages in order of appearance)."""
    points: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        steps, values = points.setdefault(str(record.get("stage", "")), ([], []))
        steps.append(int(record.get("step", len(steps))))
        values.append(float(value))
    return [Series(stage, key, tuple(s), tuple(v)) for stage, (s, v) in points.items()]


def _keys(records: list[dict], prefix: str) -> list[str]:
    """Numeric keys starting with `prefix`, in order of first appearance."""
    seen: dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            if key.startswith(prefix) and isinstance(value, (int, float)) and not isinstance(value, bool):
                seen.setdefault(key, None)
    return list(seen)


def teacher_names(records: list[dict], results: dict | None = None) -> list[str]:
    """The teachers of a run with several (`[[teachers]]`), in order of first appearance; empty for one teacher. Read
    from the per-teacher metrics (`train/align_ratio/<name>`, ...) and the results' `teacher/<name>` rows."""
    names: dict[str, None] = {}
    for key in results or {}:
        if key.startswith(TEACHER_ROW):
            names.setdefault(key[len(TEACHER_ROW) :], None)
    for key in (k for r in records for k in r):
        for base in PER_TEACHER_KEYS:
            if key.startswith(base + "/"):
                names.setdefault(key[len(base) + 1 :], None)
    return list(names)


def split_teacher(key: str, names: list[str]) -> tuple[str, str]:
    """`(base, teacher)` of a metric or result key: `("train/kd/list", ["list"])` -> `("train/kd", "list")`,
    `("exact_match/list", ...)` -> `("exact_match", "list")`; a key of no teacher -> `(key, "")`."""
    base, _, last = key.rpartition("/")
    # "train/ce" is a term even beside a teacher named "ce": a teacher's name follows a metric, not a family.
    if base and base not in METRIC_FAMILIES and last in names:
        return base, last
    return key, ""


def load_results(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DskdError(f"{path} is not valid JSON ({exc}); rerun the evaluation stage to rewrite it") from None
    if not isinstance(results, dict):
        raise DskdError(
            f"{path} must hold a JSON object of models to metrics; rerun the evaluation stage to rewrite it"
        )
    return results


def write_report(run_dir: str | Path) -> list[Path]:
    """Write the plots and `summary.md` of a run into `<run_dir>/report/`; returns the files written."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DskdError(f"run directory {run_dir} does not exist; pass the run.output_dir of a `dskd run`")
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise DskdError(f"{metrics_path} not found; `dskd report` needs a run directory that `dskd run` has logged to")
    records = load_metrics(metrics_path)
    if not records:
        raise DskdError(f"{metrics_path} is empty; wait for the run's first log interval (train.log_every steps)")
    results = load_results(run_dir / RESULTS_FILE)

    out = run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    names = teacher_names(records, results)
    written = []
    for name, draw in (
        ("losses.png", _plot_losses),
        ("eval.png", _plot_eval),
        ("alignment.png", _plot_alignment),
        ("agreement.png", _plot_agreement),
        ("teachers.png", _plot_teachers),
    ):
        figure = draw(records, names)
        if figure is not None:
            figure.savefig(out / name, dpi=110)
            written.append(out / name)
    summary = out / "summary.md"
    summary.write_text(_summary(run_dir, records, results, [p.name for p in written], names), encoding="utf-8")
    written.append(summary)
    return written


# ----------------------------------------------------------------------------------------------------- plots


def _figure(panels: int):
    # Imported here: matplotlib takes about a second to import, which `dskd run` and the other commands
    # should not pay. The Agg canvas is attached explicitly, so nothing touches pyplot or a display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5 * panels, 3.8), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(1, panels, squeeze=False)[0]


def _label(key: str) -> str:
    return key.split("/", 1)[-1]


def _percent(values: tuple[float, ...]) -> list[float]:
    """Values on a 0-100 scale: a series that never exceeds 1 was logged as a fraction."""
    return [100.0 * v for v in values] if max(values) <= 1.0 else list(values)


def _finish(ax, title: str, ylabel: str = "", legend: bool = False, **limits) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set(title=title, xlabel="step", ylabel=ylabel, **limits)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize="small")


def _loss_terms(records: list[dict], names: list[str]) -> list[str]:
    return [k for k in _keys(records, "train/") if split_teacher(k, names)[0] not in NOT_LOSS_TERMS]


def _plot_losses(records: list[dict], names: list[str]):
    # A teacher's own terms are drawn in its panel of teachers.png; here the run's total and shared terms.
    terms = [k for k in _loss_terms(records, names) if not split_teacher(k, names)[1]]
    by_stage: dict[str, list[Series]] = {}
    for key in terms:
        for s in series(records, key):
            by_stage.setdefault(s.stage, []).append(s)
    if not by_stage:
        return None
    figure, axes = _figure(len(by_stage))
    for ax, (stage, lines) in zip(axes, by_stage.items()):
        for s in lines:
            ax.plot(s.steps, s.values, label=_label(s.key), linewidth=2.2 if s.key == "train/loss" else 1.2)
        _finish(ax, f"training losses ({stage})" if stage else "training losses", "loss per token", legend=True)
    return figure


def _plot_teachers(records: list[dict], names: list[str]):
    """One panel per teacher: its distillation terms over the distill steps."""
    by_teacher: dict[str, list[Series]] = {}
    for key in _loss_terms(records, names):
        base, teacher = split_teacher(key, names)
        if teacher:
            by_teacher.setdefault(teacher, []).extend(series(records, key))
    if not by_teacher:
        return None
    figure, axes = _figure(len(by_teacher))
    for ax, (teacher, lines) in zip(axes, by_teacher.items()):
        for s in lines:
            ax.plot(s.steps, s.values, label=_label(split_teacher(s.key, names)[0]))
        _finish(ax, f"teacher {teacher}: distillation terms", "loss per token", legend=True)
    return figure


def _teacher_label(key: str, names: list[str], default: str = "") -> str:
    teacher = split_teacher(key, names)[1]
    return f"teacher {teacher}" if teacher else default


def _with_teachers(records: list[dict], base: str, names: list[str]) -> list[Series]:
    """`base`'s series and those of each teacher's `base/<name>`."""
    return [s for key in [base] + [f"{base}/{n}" for n in names] for s in series(records, key)]


def _plot_eval(records: list[dict], names: list[str]):
    # One panel per metric; with routed teachers, a line for all samples and one per teacher's samples.
    bases: dict[str, list[str]] = {}
    for key in _keys(records, "eval/"):
        base = split_teacher(key, names)[0]
        if base not in ("eval/teacher_agreement", "eval/teacher_kl"):
            bases.setdefault(base, []).append(key)
    if not bases:
        return None
    figure, axes = _figure(len(bases))
    several = any(len(keys) > 1 for keys in bases.values())
    for ax, (base, keys) in zip(axes, bases.items()):
        for key in keys:
            for s in series(records, key):
                label = _teacher_label(key, names, "all samples") + (f" ({s.stage})" if s.stage and several else "")
                ax.plot(s.steps, s.values, marker="o", label=label if several else (s.stage or None))
        _finish(ax, _label(base), legend=several)
    return figure


def _plot_alignment(records: list[dict], names: list[str]):
    lines = _with_teachers(records, "train/align_ratio", names)
    if not lines:
        return None
    figure, (ax,) = _figure(1)
    for s in lines:
        ax.plot(s.steps, _percent(s.values), label=_teacher_label(s.key, names) or None)
    _finish(ax, "aligned student tokens", "% of valid tokens", legend=len(lines) > 1 and bool(names), ylim=(0, 105))
    return figure


def _plot_agreement(records: list[dict], names: list[str]):
    agreement = [s for key in AGREEMENT_KEYS for s in _with_teachers(records, key, names)]
    kl = _with_teachers(records, "eval/teacher_kl", names)
    if not agreement and not kl:
        return None
    figure, axes = _figure(int(bool(agreement)) + int(bool(kl)))
    panels = iter(axes)
    if agreement:
        ax = next(panels)
        for s in agreement:
            held_out = s.key.startswith("eval/")
            teacher = _teacher_label(s.key, names)
            ax.plot(
                s.steps,
                _percent(s.values),
                marker="o" if held_out else None,
                label=("held-out" if held_out else "training") + (f", {teacher}" if teacher else ""),
            )
        title = "top-1 agreement with each teacher" if names else "top-1 agreement with the teacher"
        _finish(ax, title, "%", legend=True, ylim=(0, 105))
    if kl:
        ax = next(panels)
        for s in kl:
            ax.plot(s.steps, s.values, marker="o", label=_teacher_label(s.key, names) or None)
        _finish(ax, "held-out KL(teacher || student)", "nats per token", legend=bool(names))
    return figure


# ---------------------------------------------------------------------------------------------------- summary


def _fmt(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–"
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    return (
        f"{value:.2f}" if value == 0 or abs(value) >= 1 else f"{value:.4g}"
    )  # scores to 2 decimals; small values (KL, lr) to 4 digits


def _summary(run_dir: Path, records: list[dict], results: dict, plots: list[str], names: list[str] = ()) -> str:
    names = list(names)
    lines = [f"# Run report: {run_dir.name}", "", "## Results", ""]
    order = ["teacher"] + [f"{TEACHER_ROW}{n}" for n in names] + ["student_init", "student"]
    rows = [r for r in order if isinstance(results.get(r), dict)]
    rows += [r for r, v in results.items() if r not in rows and isinstance(v, dict)]
    if rows:
        # A teacher's own columns (teacher_agreement/<name>, ...) go to its table below.
        def shown(key: str) -> bool:
            return not split_teacher(key, names)[1]

        extra = sorted(
            {
                k
                for r in rows
                for k, v in results[r].items()
                if isinstance(v, (int, float)) and k not in RESULT_COLUMNS and shown(k)
            }
        )
        columns = [c for c in RESULT_COLUMNS if any(c in results[r] for r in rows)] + extra
        lines += ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        lines += ["| " + r + " | " + " | ".join(_fmt(results[r].get(c)) for c in columns) + " |" for r in rows]
        lines += [
            "",
            "exact_match, rougeL and teacher_agreement are on a 0-100 scale; teacher_kl is in nats per token.",
        ]
        lines += _teacher_tables(results, names)
    else:
        lines.append(f"No {RESULTS_FILE} yet: the run has not finished its final evaluation.")

    lines += ["", "## Final metrics", "", "| stage | metric | value | step |", "|---|---|---|---|"]
    last: dict[tuple[str, str], tuple[float, int]] = {}
    for record in records:
        stage = str(record.get("stage", ""))
        for key, value in record.items():
            if "/" in key and isinstance(value, (int, float)) and not isinstance(value, bool):
                last[(stage, key)] = (value, record.get("step", ""))
    lines += [f"| {stage} | {key} | {_fmt(value)} | {step} |" for (stage, key), (value, step) in last.items()]

    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _teacher_tables(results: dict, names: list[str]) -> list[str]:
    """With several teachers, one row per teacher: its own scores on the samples it serves, and each student's
    scores on those samples (when routed), agreement with it and KL to it there."""
    if not names:
        return []
    students = [r for r in ("student_init", "student") if isinstance(results.get(r), dict)]
    columns = ["teacher", "samples", "teacher exact_match", "teacher rougeL"]
    for student in students:
        columns += [f"{student} {k}" for k in ("exact_match", "rougeL", "teacher_agreement", "teacher_kl")]
    lines = ["", "### Per teacher", "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for name in names:
        own = results.get(f"{TEACHER_ROW}{name}", {})
        own = own if isinstance(own, dict) else {}
        cells = [name, _fmt(own.get("num_examples")), _fmt(own.get("exact_match")), _fmt(own.get("rougeL"))]
        for student in students:
            cells += [_fmt(results[student].get(f"{k}/{name}")) for k in RESULT_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Each teacher is scored on the evaluation samples it serves (samples); a student's exact_match and rougeL "
        "there appear for a routed teacher, its teacher_agreement and teacher_kl on the held-out samples that "
        "teacher serves.",
    ]
    return lines
