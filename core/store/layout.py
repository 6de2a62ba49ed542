"""Where a teacher store keeps what, and its two JSON records: the build plan and the manifest.

DIR/build.json           the plan every worker builds against (teacher, data, mode, shard size, ...)
DIR/shards/shard-NNNNN.safetensors   the samples of shard N (ids, label-row signal)
DIR/shards/shard-NNNNN.json          its sidecar: sha256, size, sample keys; written after the shard,
                                     so a shard without one never reads as complete
DIR/head.safetensors     the teacher's LM head (and input embeddings when they are not the head's weight)
DIR/tokenizer/           the teacher's tokenizer files
DIR/index.json           every shard's sidecar, in order
DIR/manifest.json        written last: its presence means the store is finished (and never overwritten)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FORMAT = 1
PLAN = "build.json"
MANIFEST = "manifest.json"
INDEX = "index.json"
HEAD = "head.safetensors"
TOKENIZER = "tokenizer"
SHARDS = "shards"

MODES = {"hidden": ("bfloat16", "float32", "int8"), "topk": ("float16", "bfloat16")}
"""Store mode -> the dtypes its signal can be kept in (the first is the default)."""

PLAN_KEYS = (
    "format",
    "mode",
    "dtype",
    "k",
    "teacher_fingerprint",
    "tokenizer_fingerprint",
    "teacher_dtype",
    "hidden_size",
    "vocab_size",
    "splits",
    "data_fingerprints",
    "samples",
    "shard_samples",
    "max_length",
    "max_prompt_length",
)


def shard_stem(index: int) -> str:
    return f"shard-{index:05d}"


def shard_path(root: Path, index: int) -> Path:
    return Path(root) / SHARDS / f"{shard_stem(index)}.safetensors"


def sidecar_path(root: Path, index: int) -> Path:
    return Path(root) / SHARDS / f"{shard_stem(index)}.json"


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when it is missing or not a complete JSON object."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` is either absent, its old content, or all of `data`.

    A temporary file in the same folder is written, flushed and fsync'd, then renamed over `path` and the folder
    fsync'd, so a crash or a full disk never leaves a partly written file under the final name. On any error the
    temporary file is removed and the error re-raised.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, value: dict[str, Any]) -> None:
    write_atomic(path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode())


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders; the rename is still atomic
        pass
    finally:
        os.close(fd)
