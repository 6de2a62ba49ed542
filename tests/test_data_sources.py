"""`data.train` / `valid` / `test` as any source `datasets` reads: every local format gives the examples JSONL
gives; save_to_disk folders (Dataset and DatasetDict, split by name); folders of data files with `data_files`;
and the one-line errors, including a hub name on a machine without network (answered in seconds)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from datasets import Dataset, DatasetDict

from dskd.config import DataConfig, load_config
from dskd.data.examples import load_examples
from dskd.data.sources import classify, looks_like_hub_name, open_stream
from dskd.errors import ConfigError, DataError

ROWS = [
    {"instruction": "Add them.", "context": "2 and 3", "response": "5"},
    {"instruction": "Name a colour.", "context": "", "response": "007"},
    {"instruction": "Say NA.", "context": "", "response": "NA"},
    {"instruction": "Quote, with commas", "context": 'a "quoted"\nline', "response": "true"},
    {"instruction": "Unicode: Grüße, 東京", "context": "", "response": "naïve café\n"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_format(folder: Path, fmt: str, rows: list[dict]) -> Path:
    """The rows in `fmt`, written by another writer than the reader under test (pyarrow, json, csv modules)."""
    path = folder / f"data.{fmt}"
    table = pa.Table.from_pylist(rows)
    if fmt == "jsonl":
        write_jsonl(path, rows)
    elif fmt == "json":  # one JSON array of objects
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    elif fmt == "csv":
        import csv

        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "arrow":  # the Arrow IPC stream format of datasets' own files
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    return path


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("fmt", ["json", "parquet", "csv", "arrow"])
def test_every_local_format_gives_the_examples_jsonl_gives(tmp_path, fmt):
    expected = load_examples(write_format(tmp_path, "jsonl", ROWS), DataConfig(), "train")
    got = load_examples(write_format(tmp_path, fmt, ROWS), DataConfig(), "train")
    assert got == expected
    # Numbers, booleans and "NA" in text fields stay the text they are (CSV would type them otherwise).
    assert [e.response for e in got] == ["5", "007", "NA", "true", "naïve café\n"]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "arrow"])
def test_every_local_format_streams_the_same_rows_in_order(tmp_path, fmt):
    stream = open_stream(write_format(tmp_path, fmt, ROWS), DataConfig(), "train")
    rows = [row for table in stream.iter(batch_size=2) for row in table.to_pylist()]
    assert [r["instruction"] for r in rows] == [r["instruction"] for r in ROWS]
    assert [r["response"] for r in rows] == [r["response"] for r in ROWS]


def test_a_save_to_disk_folder_is_read_like_the_file_it_was_made_from(tmp_path):
    expected = load_examples(write_jsonl(tmp_path / "d.jsonl", ROWS), DataConfig(), "train")
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    assert classify(tmp_path / "saved", "train").kind == "disk"
    assert load_examples(tmp_path / "saved", DataConfig(), "train") == expected


def test_a_saved_dataset_dict_gives_each_split_by_its_configured_name(tmp_path):
    DatasetDict(
        {"train": Dataset.from_list(ROWS[:3]), "dev": Dataset.from_list(ROWS[3:4]), "test": Dataset.from_list(ROWS[4:])}
    ).save_to_disk(str(tmp_path / "dd"))
    cfg = DataConfig(valid_split="dev")
    assert [e.response for e in load_examples(tmp_path / "dd", cfg, "train")] == ["5", "007", "NA"]
    assert [e.response for e in load_examples(tmp_path / "dd", cfg, "valid")] == ["true"]
    assert [e.response for e in load_examples(tmp_path / "dd", cfg, "test")] == ["naïve café\n"]
    assert [e.response for e in load_examples(tmp_path / "dd", DataConfig(split="dev"), "train")] == ["true"]
    with pytest.raises(DataError) as excinfo:
        load_examples(tmp_path / "dd", DataConfig(), "valid")  # the default name, "validation", is not there
    message = one_line(excinfo)
    assert "no split 'validation'" in message and "(splits: train, dev, test)" in message
    assert "data.valid_split" in message


def test_data_files_select_files_of_a_folder_and_split_picks_among_them(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "part-a.jsonl", ROWS[:2])
    write_jsonl(folder / "part-b.jsonl", ROWS[2:])
    assert classify(folder, "train").kind == "folder"
    everything = load_examples(folder, DataConfig(), "train")
    assert sorted(e.response for e in everything) == sorted(r["response"] for r in ROWS)
    only_b = load_examples(folder, DataConfig(data_files=("part-b.jsonl",)), "train")
    assert [e.response for e in only_b] == [r["response"] for r in ROWS[2:]]


def test_a_directory_without_a_dataset_and_a_missing_file_are_one_line_each(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as excinfo:
        load_examples(tmp_path / "empty", DataConfig(), "train")
    assert "is a directory" in one_line(excinfo) and "save_to_disk" in str(excinfo.value)
    with pytest.raises(DataError) as excinfo:
        load_examples(tmp_path / "missing.parquet", DataConfig(), "test")
    message = one_line(excinfo)
    assert "data.test" in message and "not found" in message and "hub dataset name" in message


def test_a_file_in_another_format_that_is_broken_names_the_format_and_the_split(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError) as excinfo:
        load_examples(path, DataConfig(), "valid")
    message = one_line(excinfo)
    assert "data.valid" in message and "not readable as parquet" in message


def test_a_header_only_csv_is_an_empty_split(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,response\n")
    with pytest.raises(DataError, match="split is empty"):
        load_examples(path, DataConfig(), "train")


def test_hub_names_are_told_apart_from_paths():
    assert looks_like_hub_name("databricks/databricks-dolly-15k") and looks_like_hub_name("squad")
    assert not looks_like_hub_name("train.jsonl") and not looks_like_hub_name("data/train.parquet")
    assert not looks_like_hub_name("/abs/path") and not looks_like_hub_name("a/b/c")


def test_a_hub_name_without_network_is_one_line_within_seconds(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens, as offline
    started = time.monotonic()
    with pytest.raises(DataError) as excinfo:
        load_examples("someorg/some-dataset", DataConfig(), "train")
    message = one_line(excinfo)
    assert "'someorg/some-dataset'" in message and "cannot be reached" in message
    assert "use a local path" in message and "check the network" in message
    assert time.monotonic() - started < 30  # not datasets' minutes of retries (a bound, not a timing claim)


def test_a_hub_name_in_offline_mode_that_is_not_cached_is_one_line(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    # What HF_HUB_OFFLINE=1 at process start sets (the libraries read it once, at import).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as excinfo:
        load_examples("someorg/not-cached", DataConfig(), "valid")
    message = one_line(excinfo)
    assert "data.valid" in message and "'someorg/not-cached' cannot be loaded" in message and "local path" in message


def test_the_config_keeps_a_hub_name_as_written_and_resolves_data_files_to_paths(tmp_path):
    write_jsonl(tmp_path / "valid.jsonl", ROWS)
    job = tmp_path / "job.toml"
    job.write_text(
        '[run]\noutput_dir = "run"\nstages = ["distill"]\n[student]\nconfig = "s"\n[data]\n'
        'train = "someorg/some-dataset"\nvalid = "valid.jsonl"\nsubset = "en"\ndata_files = ["a/*.parquet"]\n'
    )
    (tmp_path / "s").write_text("{}")
    config = load_config(job)
    assert config.data.train == "someorg/some-dataset"
    assert config.data.valid == str((tmp_path / "valid.jsonl").resolve())
    assert config.data.data_files == ("a/*.parquet",)
    job.write_text(job.read_text().replace('"valid.jsonl"', '"nope.jsonl"'))
    with pytest.raises(ConfigError, match="data.valid: file not found"):
        load_config(job)


@pytest.mark.integration
def test_the_cli_answers_a_hub_name_without_network_with_exit_status_2(tmp_path):
    from tiny_job import write_job

    job = write_job(tmp_path)
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-m", "dskd", "run", str(job), "--set", "data.train=someorg/some-dataset"],
        cwd=tmp_path,
        env={**__import__("os").environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("dskd: error:")]
    assert len(errors) == 1 and "someorg/some-dataset" in errors[0] and "cannot be reached" in errors[0]
    assert not (tmp_path / "run" / "final").exists()
