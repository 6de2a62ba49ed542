"""The SmolLM2 example's data: split by topic (no topic in two splits), reproducible from its seed, and shaped so
no token can span the prompt and the response."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "smollm2"
DATA = EXAMPLE / "data"


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]


def test_the_splits_are_made_by_topic_and_cover_every_topic_once():
    topics = {name: {r["topic"] for r in rows(name)} for name in ("train", "valid", "test")}
    assert (len(topics["valid"]), len(topics["test"])) == (8, 8) and len(topics["train"]) > 50
    assert not (topics["train"] & topics["valid"]) and not (topics["train"] & topics["test"])
    assert not (topics["valid"] & topics["test"])
    assert {r["topic"] for r in rows("test_text")} == topics["test"]


def test_every_response_starts_a_new_line_after_a_prompt_that_ends_without_whitespace():
    template = json.loads(
        '"' + next(line for line in (EXAMPLE / "job.toml").read_text().splitlines() if line.startswith("template"))
        .split('"', 1)[1].rsplit('"', 1)[0] + '"'
    )  # fmt: skip
    assert template.endswith("### Response:")
    for name in ("train", "valid", "test"):
        for r in rows(name):
            assert r["response"].startswith("\n") and r["response"].strip()
            assert len(r["response"]) <= 321 and r["instruction"]


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the committed files were made from Python 3.11's topics")
def test_make_data_regenerates_the_committed_files_from_its_seed(tmp_path):
    subprocess.run(
        [sys.executable, str(EXAMPLE / "make_data.py"), "--out", str(tmp_path)], check=True, capture_output=True
    )
    for name in ("train", "valid", "test", "test_text"):
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (DATA / f"{name}.jsonl").read_bytes(), name
