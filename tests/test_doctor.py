"""`dskd doctor`: the pair report a user reads before training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dskd.evaluation.doctor import diagnose

TOKENIZERS = Path(__file__).resolve().parents[1] / "examples" / "tokenizers"


@pytest.mark.slow
def test_doctor_reports_overlap_alignment_and_recommends_eta_across_families(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(
        "\n".join(json.dumps({"instruction": "i", "response": r}) for r in ["Line one\nline two: 42.", "Café 😀 done"])
        + "\n"
    )
    report = diagnose(str(TOKENIZERS / "mistral"), str(TOKENIZERS / "gpt2"), str(data))
    assert report["teacher"]["family"] == "sentencepiece" and report["student"]["family"] == "byte_level"
    assert report["teacher"]["adds_bos"] and not report["student"]["adds_bos"]
    assert any("BOS" in w for w in report["warnings"])
    assert not report["vocabulary"]["identical"] and 0 < report["vocabulary"]["exact_overlap"] < 32000
    a = report["alignment"]
    assert a["samples"] == 2 and a["eta_pairs"] == a["exact_span_pairs"] and a["eta_recall"] == 1.0
    assert a["reference_greedy_ratio"] < a["eta_ratio"]  # the newline desynchronises the reference
    assert report["recommended"]["objective"] == "dskd_v2" and report["recommended"]["aligner"] == "eta"


@pytest.mark.slow
def test_doctor_on_one_tokenizer_says_identical_and_needs_no_aligner():
    report = diagnose(str(TOKENIZERS / "tinyllama"), str(TOKENIZERS / "tinyllama"))
    assert report["vocabulary"]["identical"]
    # Pure-space tokens ("▁" alone) have empty spans and are never paired, even with the same tokenizer.
    assert report["alignment"]["eta_recall"] == 1.0 and report["alignment"]["eta_ratio"] > 0.9
    assert report["recommended"] == {"objective": "dskd_v2", "aligner": "", "why": report["recommended"]["why"]}


@pytest.mark.integration
def test_doctor_json_cli_and_missing_folder_error(tmp_path):
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "dskd",
            "doctor",
            "--teacher",
            str(TOKENIZERS / "mistral"),
            "--student",
            str(TOKENIZERS / "tinyllama"),
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["alignment"]["eta_recall"] == 1.0
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "dskd",
            "doctor",
            "--teacher",
            str(tmp_path / "nope"),
            "--student",
            str(TOKENIZERS / "gpt2"),
        ],
        capture_output=True,
        text=True,
    )
    assert (
        bad.returncode == 2
        and bad.stderr.count("\n") == 1
        and "--teacher" in bad.stderr
        and "Traceback" not in bad.stderr
    )


@pytest.mark.slow
def test_doctor_compares_greedy_like_for_like_and_tokenises_special_strings_as_training(tmp_path):
    # Mistral/TinyLlama write "12" as "▁", "1", "2"; a literal "<unk>" is text in training (split_special_tokens).
    data = tmp_path / "d.jsonl"
    rows = ["Use <unk> here, then 12 plus 7 is 19.", "x  1 and   3 spaces", "The total is 12 plus 7, which makes 19."]
    data.write_text("\n".join(json.dumps({"instruction": "i", "response": r}) for r in rows) + "\n")
    a = diagnose(str(TOKENIZERS / "mistral"), str(TOKENIZERS / "tinyllama"), str(data))["alignment"]
    assert a["eta_recall"] == 1.0 and a["normalisation_mismatches"] == 0
    # Greedy's exact pairs are a subset of the exact spans ETA finds; its other pairs are counted apart.
    assert a["reference_greedy_exact_pairs"] <= a["eta_pairs"] <= a["student_tokens"]
    assert a["reference_greedy_exact_pairs"] <= a["reference_greedy_pairs"]
    assert a["reference_greedy_ratio"] == a["reference_greedy_exact_pairs"] / a["student_tokens"]
