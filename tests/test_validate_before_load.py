"""What a run would reject is found by `dskd validate` (and by `dskd run` before any model loads), one line each.

Issue 11, items 8 and 9: templates with unknown placeholders, `stages = []`, warm-up longer than the run, an
output_dir that is a file, directories and pipes given as data files, plugin option ranges, an unknown name in
DSKD_LOAD_PLUGINS; non-UTF-8 JSONL, a tokenizer folder without a tokenizer, and a teacher_sft-only job.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from tiny_job import write_job

import dskd
from dskd.config import load_config
from dskd.data.examples import load_examples
from dskd.errors import ConfigError, DataError, ModelError
from dskd.models.loading import load_tokenizer
from dskd.protos import teacher_pb2 as pb
from dskd.registry import load_registry
from dskd.run.cli import main
from dskd.servers.validation import ServerLimits, validate_generate
from dskd.servers.wire import pack_sequences


def problems(path: Path, *overrides: str, registry=None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, list(overrides), registry=registry or load_registry())
    return [str(p) for p in caught.value.problems]


def one(found: list[str], *words: str) -> str:
    hits = [p for p in found if all(w in p for w in words)]
    assert len(hits) == 1, found
    return hits[0]


def test_a_template_with_an_unknown_placeholder_is_found(tmp_path):
    path = write_job(tmp_path)
    line = one(problems(path, 'data.template="{instruction} {question} {context}"'), "data.template", "{question}")
    assert "{instruction}" in line and "{context}" in line


def test_a_template_without_instruction_is_found(tmp_path):
    one(problems(write_job(tmp_path), 'data.template="Answer: {context}"'), "data.template", "{instruction}")


def test_literal_braces_in_a_template_are_not_placeholders(tmp_path):
    load_config(write_job(tmp_path), ['data.template="{instruction} as JSON: {\\"a\\": 1}"'], registry=load_registry())


def test_no_stages_is_found(tmp_path):
    one(problems(write_job(tmp_path), "run.stages=[]"), "run.stages", "empty")


def test_warmup_longer_than_the_run_is_found(tmp_path):
    one(problems(write_job(tmp_path), "train.warmup_steps=10", "train.max_steps=4"), "train.warmup_steps", "10", "4")
    one(
        problems(write_job(tmp_path, stages=("teacher_sft",)), "teacher_sft.steps=2", "teacher_sft.warmup_steps=5"),
        "teacher_sft.warmup_steps",
    )


def test_an_output_dir_that_is_a_file_is_found(tmp_path):
    path = write_job(tmp_path)
    (tmp_path / "taken").write_text("not a directory")
    one(problems(path, "run.output_dir=taken"), "run.output_dir", "is a file")
    one(problems(path, "run.output_dir=taken/run"), "run.output_dir", "is a file")


def test_a_directory_given_as_a_data_file_is_found(tmp_path):
    path = write_job(tmp_path)
    (tmp_path / "folder").mkdir()
    one(problems(path, "data.valid=folder"), "data.valid", "directory")


def test_a_pipe_given_as_a_data_file_is_not_called_missing(tmp_path):
    path = write_job(tmp_path)
    os.mkfifo(tmp_path / "pipe.jsonl")
    line = one(problems(path, "data.train=pipe.jsonl"), "data.train")
    assert "not found" not in line and "regular file" in line
    with pytest.raises(DataError) as caught:
        load_examples(tmp_path / "pipe.jsonl", load_config(path).data, "train")
    assert "not found" not in str(caught.value) and "regular file" in str(caught.value)


def ranged_kl(student_logits, teacher_logits, *, temperature: float = 1.0, lam: float = 0.1):
    raise AssertionError("never called: validation only")


ranged_kl.option_ranges = {"lam": (0.0, 1.0)}  # how a plugin declares the closed range of an option


class RangedDivergence:
    """An in-process plugin whose divergence declares the range of its option."""

    @dskd.hookimpl
    def dskd_register_divergences(self, register):
        register("ranged_kl", ranged_kl)


def test_plugin_option_ranges_are_checked_where_declared(tmp_path):
    path = write_job(tmp_path, extra='[divergence]\nname = "ranged_kl"\n')
    registry = load_registry([RangedDivergence()])
    line = one(problems(path, "divergence.lam=1.5", registry=registry), "divergence.lam", "1.5")
    assert "[0.0, 1.0]" in line and "ranged_kl" in line
    load_config(path, ["divergence.lam=0.5"], registry=registry)


def test_an_unknown_name_in_dskd_load_plugins_warns(tmp_path, monkeypatch, capsys):
    path = write_job(tmp_path)
    monkeypatch.setenv("DSKD_LOAD_PLUGINS", "no_such_dskd_plugin_pkg")
    assert main(["validate", str(path)]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "no_such_dskd_plugin_pkg" in err and "DSKD_LOAD_PLUGINS" in err


def test_a_teacher_sft_only_job_needs_no_student(tmp_path):
    path = write_job(tmp_path, stages=("teacher_sft",))
    text = path.read_text()
    start = text.index("[student]")
    path.write_text(text[:start] + text[text.index("[data]") :] + "\n[teacher_sft]\nsteps = 1\n")
    config = load_config(path, registry=load_registry())
    assert config.run.stages == ("teacher_sft",)


def test_non_utf8_jsonl_names_the_line(tmp_path):
    path = write_job(tmp_path)
    train = tmp_path / "train.jsonl"
    lines = train.read_bytes().splitlines()
    lines[3] = b'{"instruction": "caf\xe9", "context": "", "response": "x"}'
    train.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError) as caught:
        load_examples(train, load_config(path).data, "train")
    assert "line 4" in str(caught.value) and "UTF-8" in str(caught.value)


def test_a_tokenizer_folder_without_a_tokenizer_says_so(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizerFast"}')
    config = load_config(write_job(tmp_path), [f"student.tokenizer={folder}"])
    with pytest.raises(ModelError) as caught:
        load_tokenizer(config.student, "student")
    assert "student" in str(caught.value) and "tokenizer.json" in str(caught.value) and "empty" not in str(caught.value)


def test_generate_without_top_p_means_no_nucleus_filter():
    limits = ServerLimits(
        vocab_size=100,
        hidden_size=8,
        max_seq_len=16,
        max_batch_tokens=32,
        max_top_k=10,
        max_response_bytes=4000,
        max_new_tokens=8,
    )
    request = pb.GenerateRequest(
        prompts=pack_sequences([[1, 2, 3]]), max_new_tokens=2, temperature=1.0
    )  # top_p unset: 0
    assert validate_generate(request, limits).top_p == 1.0
    assert np.isclose(
        validate_generate(pb.GenerateRequest(prompts=pack_sequences([[1]]), max_new_tokens=1, top_p=0.5), limits).top_p,
        0.5,
    )
