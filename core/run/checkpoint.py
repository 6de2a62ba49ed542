"""Resumable checkpoints that are never half-written.

A checkpoint is a folder `step-00000100/` with the student, the optimizer, the scheduler, the objective's
projectors, the policy state, RNG states, the data position and a `manifest.json` holding the sha256 of every
file. It is written under a temporary name, flushed to disk, and renamed into place, so a crash leaves either
the previous good checkpoint or the new complete one. On resume, a checkpoint whose manifest is missing or
whose files do not match their hashes is named in one line and skipped in favour of the previous good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dskd.errors import CheckpointError

FORMAT = 1
MANIFEST = "manifest.json"


@dataclass
class Loaded:
    path: Path
    manifest: dict[str, Any]

    def load(self, name: str) -> Any:
        return torch.load(self.path / f"{name}.pt", map_location="cpu", weights_only=False)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(root: Path, step: int, objects: dict[str, Any], manifest: dict[str, Any], *, keep: int) -> Path:
    """Write `objects` (name -> picklable state) as checkpoint `step` under `root`; keep the newest `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    hashes = {}
    for name, obj in objects.items():
        path = tmp / f"{name}.pt"
        with path.open("wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        hashes[path.name] = _sha256(path)
    body = {"format": FORMAT, "step": step, "files": hashes, **manifest}
    with (tmp / MANIFEST).open("w") as handle:
        json.dump(body, handle, indent=1, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    if final.exists():  # re-saving the same step (e.g. end of run == last interval): replace it whole
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync_dir(root)
    # Prune the oldest, counting back from the one just written: a folder with a later step (left broken by
    # an earlier attempt) must never push the new checkpoint out.
    older = [p for p in checkpoints(root) if p.name < final.name]
    for old in older[: max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under `root`, oldest first (temporary folders excluded)."""
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def verify(path: Path) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not."""
    manifest = path / MANIFEST
    if not manifest.exists():
        return "no manifest (interrupted while writing)"
    try:
        body = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"unreadable manifest ({exc})"
    if body.get("format") != FORMAT:
        return f"unknown checkpoint format {body.get('format')!r}"
    for name, expected in body.get("files", {}).items():
        file = path / name
        if not file.exists():
            return f"missing {name}"
        if _sha256(file) != expected:
            return f"{name} does not match its checksum (corrupt)"
    return None


def unfinished(root: Path) -> list[Path]:
    """Temporary folders of checkpoint writes that never completed (the writer died before the rename)."""
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(".step-") and ".tmp-" in p.name)


def latest(root: Path, warn=print, companions: Sequence[Path] = ()) -> Loaded | None:
    """The newest intact checkpoint under `root`; each broken newer one is named in one line and skipped.

    `companions` are the roots of the other processes' parts (`rank-N/`): a step counts as intact only when
    every part of it is, so all processes resume from the same step.
    """
    for path in unfinished(root):
        warn(f"checkpoint {path} is unusable: an unfinished write (the run stopped while saving); ignored")
    for path in reversed(checkpoints(root)):
        reason = verify(path)
        for part in companions:
            if reason is None and (part_reason := verify(part / path.name)) is not None:
                path, reason = part / path.name, part_reason
        if reason is None:
            return Loaded(path, json.loads((path / MANIFEST).read_text()))
        warn(f"checkpoint {path} is unusable: {reason}; falling back to the previous one")
    return None


def require_latest(root: Path, warn=print) -> Loaded:
    found = latest(root, warn)
    if found is None:
        raise CheckpointError(f"no intact checkpoint under {root} to resume from; run without --resume to start afresh")
    return found
