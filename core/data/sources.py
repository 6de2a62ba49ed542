"""Where a split's rows come from: a data file, a folder, or a hub dataset, read through `datasets`.

`data.train` / `valid` / `test` name one of
- a local file of a format `datasets` reads, by its extension: `.jsonl` / `.json`, `.parquet`, `.csv`, `.arrow`
  (any other extension is read as JSONL, as dskd always did);
- a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk` (the split is picked by name), or a
  folder of data files (`data.data_files` selects among them);
- a hub dataset name (`org/name`), with `data.subset`, the split's name and `data.data_files`.

`read_rows` returns the rows of a split held in memory (memory-mapped Arrow), `open_stream` an `IterableDataset`
that reads them in order without holding them. Both raise a one-line `DataError` naming the split, the source and
the fix. Nothing here imports `datasets` at module level: the config checks use `classify` on every `dskd validate`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from dskd.config import DataConfig
from dskd.errors import DataError

# Extension -> the `datasets` packaged builder that reads it.
FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
# What `save_to_disk` leaves in its folder: a Dataset (state.json) or a DatasetDict (dataset_dict.json).
_DISK_MARKERS = ("state.json", "dataset_dict.json")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
SUPPORTED = "a data file (jsonl, json, parquet, csv, arrow), a folder saved with save_to_disk, or a hub dataset name"
HUB_REACH_TIMEOUT_S = 5.0  # a machine without network must get its answer in seconds, not after minutes of retries


@dataclass(frozen=True)
class Source:
    """What a `data.<split>` value names. `kind`: "file", "disk" (save_to_disk folder), "folder" (of data
    files) or "hub". `builder` is the `datasets` builder of a file ("json", "parquet", ...)."""

    kind: str
    value: str
    builder: str = ""

    @property
    def label(self) -> str:
        return f"hub dataset {self.value}" if self.kind == "hub" else self.value


def looks_like_hub_name(value: str) -> bool:
    """`name` or `org/name` without a data-file extension: what `datasets` would look up on the hub."""
    return bool(_HUB_NAME.match(value)) and Path(value).suffix.lower() not in FORMATS


def split_name(cfg: DataConfig, split: str) -> str:
    """The split of a DatasetDict folder or hub dataset that `data.<split>` reads."""
    return {"train": cfg.split, "valid": cfg.valid_split, "test": cfg.test_split}.get(split, split)


def classify(value: str | Path, split: str) -> Source:
    """The kind of source `value` is, or a one-line `DataError` (unset, missing file, unusable folder, pipe)."""
    text = str(value)
    if not text or text == ".":
        raise DataError(f"data.{split} is not set; point it at {SUPPORTED}")
    path = Path(text)
    where = f"data.{split} ({text})"
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if looks_like_hub_name(text):
            return Source("hub", text)
        raise DataError(f"{where}: not found; set data.{split} to {SUPPORTED}") from None
    except OSError as exc:
        raise DataError(f"{where}: cannot be read ({exc.strerror}); check the path and its permissions") from None
    if stat.S_ISDIR(mode):
        if holds_a_dataset(path):
            return Source("disk" if _saved(path) else "folder", text)
        raise DataError(
            f"{where}: is a directory with no dataset in it (no save_to_disk files, no data files); "
            f"set data.{split} to {SUPPORTED}"
        )
    if not stat.S_ISREG(mode):
        raise DataError(
            f"{where}: is not a regular file (a pipe, socket or device); set data.{split} to a JSONL file "
            "(one JSON object per line) or another data file"
        )
    return Source("file", text, FORMATS.get(path.suffix.lower(), "json"))


def _saved(folder: Path) -> bool:
    return any((folder / marker).is_file() for marker in _DISK_MARKERS)


def holds_a_dataset(folder: Path) -> bool:
    """A folder written by `save_to_disk`, or one with data files in it (what `load_dataset(folder)` reads)."""
    return _saved(folder) or _data_files_in(folder)


def _data_files_in(folder: Path) -> bool:
    try:
        return any(p.suffix.lower() in FORMATS for p in folder.rglob("*") if p.is_file())
    except OSError:
        return False


# -- in memory ---------------------------------------------------------------------------------------------------
def read_rows(value: str | Path, cfg: DataConfig, split: str, fields: list[str]) -> tuple[list[str], Any]:
    """`(column names, rows)` of one split: a `datasets.Dataset` (or a list of dicts for JSONL whose `fields`
    mix JSON types); each row is a dict. Errors are one-line `DataError`s naming the split and the source."""
    source = classify(value, split)
    where = f"data.{split} ({source.value})"
    if source.kind == "file" and source.builder == "json" and Path(source.value).suffix.lower() != ".json":
        return _read_jsonl(Path(source.value), where, split, fields)
    rows = _load(source, cfg, split, where, streaming=False)
    if len(rows) == 0:
        raise DataError(f"{where}: split is empty; add samples or point data.{split} at another source")
    return rows.column_names, rows


def _read_jsonl(path: Path, where: str, split: str, fields: list[str]) -> tuple[list[str], Any]:
    from datasets import Dataset

    try:
        with path.open("rb") as handle:
            empty = not handle.read(1 << 16).strip()
    except OSError as exc:
        raise DataError(f"{where}: cannot be read ({exc.strerror}); check the path and its permissions") from None
    if empty:
        raise DataError(f"{where}: split is empty; add samples or point data.{split} at another file")
    check_utf8(path, where)
    try:
        rows = Dataset.from_json(str(path), split="train")
    except Exception as exc:  # datasets wraps pyarrow's parse errors; find the offending line ourselves
        diagnose_jsonl(path, where)
        raise DataError(
            f"{where}: not readable as JSONL ({str(exc).splitlines()[0]}); write one JSON object per line"
        ) from None
    if len(rows) == 0:
        raise DataError(f"{where}: split is empty; add samples or point data.{split} at another file")
    if any(type(rows.features.get(name)).__name__ == "Json" for name in fields):
        # A field holding different JSON types (a string in some records, a list in others, as Dolly-style
        # reference lists do) gets datasets' `Json` type, which stores strings that look like JSON unquoted:
        # the response "5" comes back as the integer 5. Such files are read with the json module instead.
        return rows.column_names, _read_json_lines(path)
    return rows.column_names, rows


def check_utf8(path: Path, where: str) -> None:
    """Name the first line that is not UTF-8: pyarrow reads such bytes and fails only when a row is used."""
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{where}: line {number} is not UTF-8 (byte 0x{line[exc.start]:02x} at column {exc.start + 1}); "
                    f"re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                ) from None


def _read_json_lines(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def diagnose_jsonl(path: Path, where: str) -> None:
    """Raise a `DataError` for the first line that is not a JSON object (returns if none is found)."""
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{where}: line {number} is not JSON ({exc.msg}); write one JSON object per line (JSONL)"
                ) from None
            if not isinstance(value, dict):
                raise DataError(
                    f"{where}: line {number} is a {type(value).__name__}, not a JSON object; write one object per line (JSONL)"
                )


# -- streaming ---------------------------------------------------------------------------------------------------
def open_stream(value: str | Path, cfg: DataConfig, split: str, *, rank: int = 0, world_size: int = 1) -> Any:
    """An `IterableDataset` over the split's rows in order, this data-parallel rank's part of it only
    (`datasets.distributed.split_dataset_by_node`: whole shards per rank when they divide evenly, else every
    `world_size`-th row), formatted as Arrow tables so rows are turned into Python only where they are used."""
    from datasets.distributed import split_dataset_by_node

    source = classify(value, split)
    where = f"data.{split} ({source.value})"
    if source.kind == "file" and source.builder == "json" and Path(source.value).suffix.lower() != ".json":
        check_utf8(Path(source.value), where)  # a bad byte would otherwise fail deep in a worker, mid-run
    stream = _load(source, cfg, split, where, streaming=True)
    if world_size > 1:
        stream = split_dataset_by_node(stream, rank=rank, world_size=world_size)
    return stream.with_format("arrow")


# -- both ---------------------------------------------------------------------------------------------------------
def _load(source: Source, cfg: DataConfig, split: str, where: str, *, streaming: bool) -> Any:
    """A `Dataset` (or with `streaming`, an `IterableDataset`) of the source's split."""
    import datasets

    name = split_name(cfg, split)
    data_files = list(cfg.data_files) or None
    try:
        if source.kind == "disk":
            loaded = datasets.load_from_disk(source.value)
            if isinstance(loaded, datasets.DatasetDict):
                if name not in loaded:
                    raise DataError(
                        f"{where}: the saved DatasetDict has no split {name!r} (splits: {', '.join(loaded)}); "
                        f"set data.{_split_key(split)} to one of them"
                    )
                loaded = loaded[name]
            if streaming:
                # Several shards let DDP ranks take whole shards; rows stay in order within each.
                return loaded.to_iterable_dataset(num_shards=max(1, min(len(loaded), 64)))
            return loaded
        if source.kind == "file":
            options = _csv_as_text(Path(source.value), where) if source.builder == "csv" else {}
            return datasets.load_dataset(
                source.builder, data_files=source.value, split="train", streaming=streaming, **options
            )
        if source.kind == "hub":
            _require_hub(source.value, where)
        return datasets.load_dataset(
            source.value, cfg.subset or None, split=name, data_files=data_files, streaming=streaming
        )
    except DataError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        if "corresponds to no data" in first:  # datasets' words for a file with a header and no rows
            raise DataError(f"{where}: split is empty; add samples or point data.{split} at another source") from None
        if source.kind == "hub":
            raise DataError(
                f"{where}: the hub dataset {source.value!r} cannot be loaded ({first}); check its name, data.subset, "
                f"data.{_split_key(split)} and data.data_files, or use a local path"
            ) from None
        raise DataError(
            f"{where}: not readable as {source.builder or 'a dataset'} ({first}); check the file, or set data.{split} to {SUPPORTED}"
        ) from None


def _csv_as_text(path: Path, where: str) -> dict[str, Any]:
    """Read every CSV column as text: pandas would turn a response "5" into 5, "007" into 7 and "NA" into a
    missing value, and dskd's fields are text."""
    import csv

    from datasets import Features, Value

    try:
        with path.open(newline="", encoding="utf-8") as handle:
            names = next(csv.reader(handle), [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(
            f"{where}: the CSV header cannot be read ({exc}); write a UTF-8 CSV file with a header row"
        ) from None
    if not names:
        raise DataError(f"{where}: split is empty; add a header row and samples, or point the split at another file")
    return {"features": Features({name: Value("string") for name in names}), "keep_default_na": False}


def _split_key(split: str) -> str:
    return {"train": "split", "valid": "valid_split", "test": "test_split"}.get(split, "split")


def _offline() -> bool:
    return any(
        os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _require_hub(name: str, where: str) -> None:
    """Fail in seconds, in one line, when a hub name is given and the hub cannot be reached: without this,
    `datasets` retries its HTTP calls for minutes. In offline mode the local cache answers (or the load fails)."""
    if _offline():
        return
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host, port = parsed.hostname or "huggingface.co", parsed.port or (80 if parsed.scheme == "http" else 443)
    problem = _unreachable(host, port, HUB_REACH_TIMEOUT_S)
    if problem:
        raise DataError(
            f"{where}: {name!r} is not a local file or folder, so it was taken as a hub dataset name, but the hub "
            f"({host}) cannot be reached ({problem}); use a local path (a data file or a save_to_disk folder), "
            "check the network, or set HF_HUB_OFFLINE=1 to use a cached copy"
        )


def _unreachable(host: str, port: int, timeout: float) -> str:
    """Why a TCP connection to `host:port` fails within `timeout` seconds (name lookup included), or ""."""
    outcome: list[str] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append("")
        except OSError as exc:
            outcome.append(exc.strerror or type(exc).__name__)

    thread = threading.Thread(target=attempt, daemon=True)  # a name lookup ignores socket timeouts
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:.0f} s"
