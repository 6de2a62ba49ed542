"""Samples whose two tokenizations disagree about the text (an NFC teacher tokenizer on NFD data) are counted in
the data pipeline (`text_differs`), said once in the log, and logged as `data/normalisation_mismatches`."""

from __future__ import annotations

import importlib.util
import json
import unicodedata
from pathlib import Path

import pytest
from tiny_job import llama_config, write_job
from transformers import AutoTokenizer

from dskd.config import DataConfig, load_config
from dskd.data.examples import Example, tokenize_split
from dskd.plugins.aligners.eta import eta
from dskd.registry import load_registry
from dskd.run.job import Job

ROOT = Path(__file__).resolve().parents[1]
ACCENTED = ["Le café était fermé.", "L'élève a trouvé une crème brûlée.", "Plain ASCII text here."]


def nfc_tokenizer(folder: Path):
    spec = importlib.util.spec_from_file_location("bench_align", ROOT / "benchmarks" / "bench_align.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.nfc_byte_level_tokenizer(folder)


def test_the_split_marks_exactly_the_samples_whose_tokenizations_disagree(tmp_path):
    teacher = nfc_tokenizer(tmp_path / "nfc")
    student = AutoTokenizer.from_pretrained(ROOT / "examples" / "tokenizers" / "tinyllama")
    responses = [unicodedata.normalize("NFD", text) for text in ACCENTED]
    examples = [Example(prompt="Q:", references=(" " + r,)) for r in responses]
    rows = tokenize_split(
        examples, student, teacher, DataConfig(max_length=64, max_prompt_length=16), aligner=eta(teacher, student)
    )
    assert rows["text_differs"] == [True, True, False]  # the ASCII sample reads the same in both
    assert all(len(a) > 0 for a in rows["alignment"])  # and still pairs tokens around the differences


@pytest.mark.integration
def test_a_distillation_on_nfd_data_says_so_once_and_logs_the_count(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    nfc_tokenizer(tmp_path / "nfc")
    path = write_job(tmp_path, samples=8, objective="dskd_v2", steps=2)
    (tmp_path / "teacher" / "config.json").write_text(json.dumps(llama_config(24, vocab=50257)))
    lines = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    for row in lines[:3]:
        row["response"] = unicodedata.normalize("NFD", "Le café était fermé, l'élève est arrivé. ") + row["response"]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in lines))
    registry = load_registry()
    config = load_config(path, ["teacher.tokenizer=nfc", "aligner.name=eta"], registry=registry)
    job = Job(config, registry)
    job.prepare_run_dir()
    job.distill(None)
    err = capsys.readouterr()
    assert (err.out + err.err).count("disagree about the text") == 1
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r["data/normalisation_mismatches"] == 3.0 for r in records if r["stage"] == "distill")
