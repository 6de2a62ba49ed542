"""Training from a teacher store is training from its teacher: the same losses where the store keeps the teacher's
dtype, for a student of another tokenizer too (it re-aligns against the stored teacher ids); and a store that does
not fit the job is refused at setup with one line and exit status 2."""

from __future__ import annotations

import json
import shutil

import pytest
from store_jobs import REGISTRY, store_job

from dskd.config import load_config
from dskd.run.cli import main
from dskd.run.job import Job
from dskd.store.build import BuildOptions, build_store
from dskd.store.layout import shard_path

pytestmark = pytest.mark.integration
LOSSES = ("train/loss", "train/ce", "train/kd_teacher_space", "train/projector_ce", "train/accepted_pairs")


def _distil(path, overrides) -> list[dict]:
    config = load_config(path, overrides, registry=REGISTRY)
    job = Job(config, REGISTRY)
    job.prepare_run_dir()
    job.distill(None)
    return [json.loads(line) for line in (job.run_dir / "metrics.jsonl").read_text().splitlines()]


def _build(path, out, overrides=(), **options):
    config = load_config(path, list(overrides), registry=REGISTRY)
    assert build_store(config, REGISTRY, out, BuildOptions(batch_size=4, shard_samples=8, **options)).finished
    return out


@pytest.mark.parametrize("student", ["gpt2", "mistral"])
def test_a_student_of_another_tokenizer_trains_from_the_store_with_the_live_teachers_losses(tmp_path, student):
    path = store_job(tmp_path, samples=24, student=student, steps=3)
    store = _build(path, tmp_path / "store", dtype="float32")  # float32: the CPU teacher's own dtype, so exact
    live = _distil(path, ["run.output_dir=live"])
    stored = _distil(path, ["run.output_dir=stored", f"teacher.store={store}"])
    assert [r["step"] for r in stored] == [r["step"] for r in live] == [1, 2, 3]
    assert live[0]["train/accepted_pairs"] > 0  # the teacher-student pairs of two tokenizers were aligned
    for a, b in zip(live, stored):
        for key in LOSSES:
            assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(a[key])), (key, a[key], b[key])
    assert stored[-1]["teacher/store_reads"] > 0


def test_dskd_cma_attends_over_the_teacher_embeddings_kept_in_the_store(tmp_path):
    path = store_job(tmp_path, samples=24, student="gpt2", objective="dskd_cma", steps=2)
    store = _build(path, tmp_path / "store", dtype="float32")
    live = _distil(path, ["run.output_dir=live"])
    stored = _distil(path, ["run.output_dir=stored", f"teacher.store={store}", 'teacher.config=""'])
    assert len(live) == len(stored) == 2
    for a, b in zip(live, stored):
        assert abs(a["train/loss"] - b["train/loss"]) <= 1e-6 * max(1.0, abs(a["train/loss"]))


def test_kd_learns_from_a_topk_store_as_from_the_live_teachers_top_k(tmp_path):
    path = store_job(tmp_path, samples=24, objective="kd", steps=3)
    # top-k log-probabilities cannot be re-tempered, so a sparse teacher is distilled at temperature 1
    sparse = ["objective.teacher_signal=top_k", "objective.top_k=8", "objective.temperature=1.0"]
    store = _build(path, tmp_path / "store", mode="topk", k=16)  # a top-16 store serves a top-8 objective exactly
    live = _distil(path, ["run.output_dir=live", *sparse])
    stored = _distil(path, ["run.output_dir=stored", f"teacher.store={store}", *sparse])
    for a, b in zip(live, stored):
        for key in ("train/loss", "train/ce", "train/kd"):
            assert abs(a[key] - b[key]) <= 1e-3 * max(1.0, abs(a[key])), (key, a[key], b[key])  # float16 log-probs


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    path = store_job(root, samples=12)
    return path, _build(path, root / "hidden"), _build(path, root / "topk", mode="topk", k=8)


def _one_line(capsys, *argv) -> str:
    code = main(["run", *argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dskd: error:")]
    assert code == 2 and len(lines) == 1, err[-2000:]
    return lines[0]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["data.max_length=120"], "built with data.max_length = 128"),
        (["run.seed=4"], "holds teacher"),  # the job's random-init teacher is seeded from run.seed: another teacher
        (["policy.name=on_policy"], "needs the live teacher"),
        (['\'run.stages=["teacher_sft", "distill"]\'', "teacher_sft.steps=1"], "teacher_sft trains a live teacher"),
    ],
)
def test_a_store_that_does_not_fit_the_job_is_one_line(stores, capsys, overrides, expected):
    path, hidden, _ = stores
    argv = [str(path), "--set", f"teacher.store={hidden}", "--set", "run.output_dir=" + str(path.parent / "unused")]
    for override in overrides:
        argv += ["--set", override.strip("'")]
    assert expected in _one_line(capsys, *argv)
    assert not (path.parent / "unused" / "checkpoints").exists()


def test_other_training_data_than_the_store_was_built_from_is_one_line(stores, capsys, tmp_path):
    path, hidden, _ = stores
    other = tmp_path / "train.jsonl"
    other.write_text("\n".join((path.parent / "train.jsonl").read_text().splitlines()[1:]) + "\n")
    line = _one_line(capsys, str(path), "--set", f"teacher.store={hidden}", "--set", f"data.train={other}")
    assert "built from other data.train" in line


def test_a_mode_the_objective_cannot_use_is_one_line(stores, capsys):
    path, _, topk = stores
    line = _one_line(capsys, str(path), "--set", f"teacher.store={topk}")  # dskd_v2 needs hidden states
    assert "holds mode 'topk'" in line and "'dskd_v2'" in line and "--mode hidden" in line


def test_a_truncated_shard_is_one_line_before_training(stores, capsys, tmp_path):
    path, hidden, _ = stores
    copy = tmp_path / "store"
    shutil.copytree(hidden, copy)
    shard = shard_path(copy, 0)
    shard.write_bytes(shard.read_bytes()[:100])
    line = _one_line(capsys, str(path), "--set", f"teacher.store={copy}", "--set", f"run.output_dir={tmp_path / 'run'}")
    assert "truncated" in line and "verify" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_verify_and_info_on_the_command_line(stores, capsys, tmp_path):
    _, hidden, _ = stores
    assert main(["teacher-store", "verify", str(hidden)]) == 0
    assert main(["teacher-store", "info", str(hidden)]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info["finished"] and info["coverage"]["samples"] == "12/12"
    assert info["signal_bytes_per_token"] == 2 * 24  # bf16 hidden states of a 24-wide teacher
    copy = tmp_path / "store"
    shutil.copytree(hidden, copy)
    data = bytearray(shard_path(copy, 1).read_bytes())
    data[len(data) // 2] ^= 0x10
    shard_path(copy, 1).write_bytes(bytes(data))
    assert main(["teacher-store", "verify", str(copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shard-00001.safetensors does not match its sha256" in err[0]
