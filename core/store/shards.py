"""Shard files: written atomically, checksummed by a sidecar written after them, read through mmap.

A shard is a safetensors file of its samples' ids and label-row signal (`encoding`). Its sidecar JSON (sha256,
size, sample keys) is written only after the shard is renamed into place, so a shard reads as complete exactly
when its sidecar exists and names its size: a crash or a full disk between the two leaves a shard that the next
build simply writes again.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from dskd.errors import StoreError
from dskd.store.layout import read_json, shard_path, sidecar_path, write_atomic, write_json_atomic

CHUNK = 1 << 22


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def write_shard(root: Path, index: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Write shard `index` and then its sidecar (`meta` plus sha256 and size); return the sidecar."""
    data = save({name: t.contiguous() for name, t in tensors.items()})
    path = shard_path(root, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)
    sidecar = {
        **meta,
        "shard": index,
        "file": path.name,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    write_json_atomic(sidecar_path(root, index), sidecar)
    return sidecar


def complete_sidecar(root: Path, index: int) -> dict[str, Any] | None:
    """Shard `index`'s sidecar when the shard is complete (both files, the size it names), else None."""
    sidecar = read_json(sidecar_path(root, index))
    if sidecar is None:
        return None
    path = shard_path(root, index)
    try:
        size = path.stat().st_size
    except OSError:
        return None
    return sidecar if size == sidecar.get("bytes") else None


class ShardReader:
    """Reads samples of the shards of one store. Each shard is checked when first opened: its size on every open,
    its sha256 once (a full read, which also warms the page cache for the reads that follow); a mismatch is a
    `StoreError` naming the shard and `dskd teacher-store verify`. Safe to use from several threads."""

    def __init__(self, root: Path, sidecars: list[dict[str, Any]], *, check_sha256: bool = True) -> None:
        self.root = Path(root)
        self.sidecars = sidecars
        self.check_sha256 = check_sha256
        self._open: dict[int, Any] = {}
        self._lock = threading.Lock()

    def _handle(self, index: int):
        handle = self._open.get(index)
        if handle is not None:
            return handle
        with self._lock:
            handle = self._open.get(index)
            if handle is None:
                sidecar = self.sidecars[index]
                path = shard_path(self.root, index)
                where = f"teacher store {self.root}: shard {path.name}"
                try:
                    size = path.stat().st_size
                except OSError as exc:
                    raise StoreError(f"{where} cannot be read ({exc.strerror}); rebuild the store") from None
                if size != sidecar["bytes"]:
                    raise StoreError(
                        f"{where} has {size} bytes but was written with {sidecar['bytes']} (truncated or replaced); "
                        f"rebuild the store (`dskd teacher-store verify {self.root}` lists every damaged shard)"
                    )
                if self.check_sha256 and file_sha256(path) != sidecar["sha256"]:
                    raise StoreError(
                        f"{where} does not match its sha256 checksum (corrupt); rebuild the store "
                        f"(`dskd teacher-store verify {self.root}` lists every damaged shard)"
                    )
                try:
                    handle = safe_open(str(path), framework="pt")
                except Exception as exc:
                    raise StoreError(f"{where} is not a readable safetensors file ({exc}); rebuild the store") from None
                self._open[index] = handle
        return handle

    def sample(self, index: int, slot: int) -> dict[str, torch.Tensor]:
        """Sample `slot` of shard `index`: `ids` (all its teacher ids), `prompt_len`, and its label rows' tensors."""
        handle = self._handle(index)
        id_offsets = handle.get_slice("id_offsets")[slot : slot + 2]
        row_offsets = handle.get_slice("row_offsets")[slot : slot + 2]
        a, b = int(row_offsets[0]), int(row_offsets[1])
        out = {
            "ids": handle.get_slice("ids")[int(id_offsets[0]) : int(id_offsets[1])],
            "prompt_len": int(handle.get_slice("prompt_len")[slot : slot + 1][0]),
        }
        for name in self.sidecars[index]["row_tensors"]:
            out[name] = handle.get_slice(name)[a:b]
        return out
