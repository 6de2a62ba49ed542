"""`dskd teacher-store info` and `verify`: what a store holds, and whether every byte is as written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dskd.errors import StoreError
from dskd.store.layout import HEAD, INDEX, MANIFEST, PLAN, TOKENIZER, read_json, shard_path
from dskd.store.shards import complete_sidecar, file_sha256


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def store_info(root: str | Path) -> dict[str, Any]:
    """Manifest (or, for an unfinished build, its plan), size on disk, bytes per label token and coverage."""
    root = Path(root)
    manifest = read_json(root / MANIFEST)
    record = manifest or read_json(root / PLAN)
    if record is None:
        raise StoreError(
            f"{root} is not a teacher store (no {MANIFEST} or {PLAN}); build one with `dskd teacher-store build`"
        )
    total = -(-record["samples"] // record["shard_samples"])
    sidecars = [complete_sidecar(root, shard) for shard in range(total)]
    done = [s for s in sidecars if s is not None]
    rows = sum(s["rows"] for s in done)
    shard_bytes = sum(s["bytes"] for s in done)
    size = folder_bytes(root)
    return {
        "store": str(root),
        "finished": manifest is not None,
        "manifest": {k: v for k, v in record.items() if k not in ("tokenizer_files",)},
        "bytes": size,
        "shard_bytes": shard_bytes,
        "signal_bytes_per_token": record.get("row_bytes"),
        "shard_bytes_per_token": round(shard_bytes / rows, 2) if rows else None,
        "bytes_per_token": round(size / rows, 2) if rows else None,
        "coverage": {
            "shards": f"{len(done)}/{total}",
            "samples": f"{sum(s['samples'] for s in done)}/{record['samples']}",
            "label_tokens": rows,
            "splits": {
                split: sum(1 for s in done for sp, _ in s["sample_ids"] if sp == split) for split in record["splits"]
            },
        },
    }


def verify_store(root: str | Path) -> list[str]:
    """Re-read every checksum of a finished store; the list of problems (empty: intact)."""
    root = Path(root)
    manifest = read_json(root / MANIFEST)
    if manifest is None:
        raise StoreError(
            f"{root} holds no finished teacher store (no {MANIFEST}); `dskd teacher-store info {root}` shows its state"
        )
    problems = []

    def check(path: Path, expected: str, what: str, size: int | None = None) -> None:
        if not path.is_file():
            problems.append(f"{what} {path.name} is missing")
        elif size is not None and path.stat().st_size != size:
            problems.append(f"{what} {path.name} has {path.stat().st_size} bytes, written with {size} (truncated)")
        elif file_sha256(path) != expected:
            problems.append(f"{what} {path.name} does not match its sha256 (corrupt)")

    check(root / INDEX, manifest["index_sha256"], "index")
    check(root / HEAD, manifest["head"]["sha256"], "head")
    for name, digest in manifest["tokenizer_files"].items():
        check(root / TOKENIZER / name, digest, "tokenizer file")
    index = read_json(root / INDEX)
    if index is not None:
        for sidecar in index["shards"]:
            check(shard_path(root, sidecar["shard"]), sidecar["sha256"], "shard", sidecar["bytes"])
    return problems
