"""Resumable checkpoints that are never half-written.

A checkpoint is a folder `step-00000100/` with the student, the optimizer, the scheduler, the objective's
projectors, the policy state, RNG states, the data position and a `manifest.json` holding the sha256 of every
file. It is written under a temporary name, flushed to disk, and renamed into place, so a crash leaves either
the previous good checkpoint or the new complete one. On resume, a checkpoint whose manifest is missing or
whose files do not match their hashes is named in one line and skipped in favour of the previous good one.

Under FSDP (`dskd.run.sharding`) the student and optimizer state are not pickled by the main process: every
process writes its shards with `torch.distributed.checkpoint` into `sharded/` of the same temporary folder, and the
main process adds the rest, hashes everything and renames the folder into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dskd.errors import CheckpointError, DskdError, TeacherError
from dskd.models.lora import checkpoint_state, load_checkpoint_state

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


def save(
    root: Path, step: int, objects: dict[str, Any], manifest: dict[str, Any], *, keep: int, tmp: Path | None = None
) -> Path:
    """Write `objects` (name -> picklable state) as checkpoint `step` under `root`; keep the newest `keep`.

    `tmp`: a temporary folder (`sharded_tmp`) that other writers have already filled (FSDP shards); its files
    enter the manifest like the objects' and move into place with them."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    hashes = {}
    if tmp is None:
        tmp = root / f".step-{step:08d}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    else:
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            hashes[str(path.relative_to(tmp))] = _sha256(path)
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


def sharded_tmp(root: Path, step: int) -> Path:
    """The temporary folder that every process writes its shards of checkpoint `step` into (one name for all)."""
    return root / f".step-{step:08d}.tmp-sharded"


def written_world_size(run_dir: Path) -> int | None:
    """The number of processes that wrote the newest checkpoint of any stage under `run_dir`, or None."""
    sizes = []
    for stage in sorted((run_dir / "checkpoints").glob("*")):
        for path in reversed(checkpoints(stage)):
            try:
                sizes.append(int(json.loads((path / MANIFEST).read_text()).get("world_size", 1)))
                break
            except (OSError, ValueError, TypeError):
                continue
    return sizes[-1] if sizes else None


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


def require_finite(model: torch.nn.Module, extra: torch.nn.Module | None, what: str) -> None:
    """Raise a `DskdError` instead of saving `what` when a parameter of `model` (or `extra`) is NaN or infinite.
    One device->host copy for all parameters."""
    named = list(model.named_parameters()) + (
        [] if extra is None else [(f"projectors.{n}", p) for n, p in extra.named_parameters()]
    )
    if not named:
        return
    from torch.distributed.tensor import DTensor

    # A sharded (FSDP) parameter is checked shard by shard and the verdicts combined over processes, so every
    # process raises here or none does.
    local = [p.to_local() if isinstance(p, DTensor) else p for _, p in named]
    device = local[0].device
    finite = torch.stack([p.detach().isfinite().all().to(device) for p in local]).to(torch.int32)
    if any(isinstance(p, DTensor) for _, p in named):
        import torch.distributed as dist

        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    bad = [name for (name, _), ok in zip(named, finite.tolist()) if not ok]
    if bad:
        listed = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise DskdError(
            f"not saving the {what}: its weights are not finite ({listed}); lower train.lr, or resume from an earlier checkpoint"
        )


class StageCheckpoints:
    """The checkpoints of one training stage (`<run>/checkpoints/<stage>/`): what a `Trainer` saves and resumes.

    Every process keeps its own RNG and data position (`rank-N/`); the main process also writes the model,
    optimizer, schedule, projectors and policy. A step is resumed only when every process's part of it is intact.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.root = trainer.spec.run_dir / "checkpoints" / trainer.spec.name
        self.saved_step = -1  # the step of the newest checkpoint on disk (written or resumed from)
        self.data_position: Any = None  # a stream's position, from the resumed checkpoint
        self.last_save = time.monotonic()

    def _objects(self) -> dict[str, Any]:
        t = self.trainer
        objects = {}
        if not t.sharded:  # sharded: the student and optimizer state are written by every process (`_save_shards`)
            objects["model"] = checkpoint_state(t.accelerator.unwrap_model(t.model))  # a LoRA student: its adapters
            objects["optimizer"] = t.optimizer.state_dict()
        objects |= {
            "scheduler": t.scheduler.state_dict(),
            "policy": t.spec.policy.state_dict(),
            "rng": rng_state(),
        }
        if t.projectors is not None:
            objects["objective"] = t.projectors.state_dict()
        return objects

    def save(self) -> None:
        t = self.trainer
        acc = t.accelerator
        acc.wait_for_everyone()
        # Never a checkpoint of non-finite weights: it would replace (prune) the last good one. The weights are the
        # same on every process, so every process raises here or none does.
        require_finite(acc.unwrap_model(t.model), t.projectors, f"{t.spec.name} checkpoint in {self.root}")
        rank = acc.process_index
        manifest = {
            "stage": t.spec.name,
            "state": vars(t.state).copy(),
            "fingerprints": t.spec.fingerprints,
            "world_size": acc.num_processes,
        }
        root = self.root if rank == 0 else self.root / f"rank-{rank}"
        shards = self._save_shards() if t.sharded else None
        objects = self._objects() if rank == 0 else {"rng": rng_state(), "policy": t.spec.policy.state_dict()}
        position = getattr(getattr(t, "batches", None), "state_dict", None)
        if position is not None:  # a stream: this process's position after the consumed batches
            objects["data"] = position(t.state.consumed)
        save(
            root, t.state.step, objects, manifest, keep=t.train_cfg.keep_checkpoints, tmp=shards if rank == 0 else None
        )
        self.saved_step = t.state.step
        self.last_save = time.monotonic()
        acc.wait_for_everyone()

    def _save_shards(self) -> Path:
        """Every process writes its shards of the student and optimizer into one temporary folder (rank 0 then
        adds the rest, hashes everything and renames it into place)."""
        from dskd.run.sharding import save_sharded

        t = self.trainer
        tmp = sharded_tmp(self.root, t.state.step)
        if t.accelerator.is_main_process:
            if tmp.exists():  # left by a run killed while saving this step
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        t.accelerator.wait_for_everyone()
        save_sharded(tmp / "sharded", t.model, t.projectors, t.optimizer)
        t.accelerator.wait_for_everyone()
        return tmp

    def due(self) -> bool:
        """`train.save_every_minutes` passed since the last checkpoint. Asked only at log steps: with several
        processes every one must save at the same step, so rank 0's clock decides, in one small collective."""
        acc, minutes = self.trainer.accelerator, self.trainer.train_cfg.save_every_minutes
        if not minutes:
            return False
        due = time.monotonic() - self.last_save >= 60.0 * minutes
        if acc.num_processes > 1:
            from accelerate.utils import broadcast

            due = bool(broadcast(torch.tensor([float(due)], device=acc.device), from_process=0).item())
        return due

    def before_stopping(self, error: TeacherError, state: Any, rng: dict[str, Any]) -> TeacherError:
        """The teacher stayed away past `teacher.retry_timeout_s`: checkpoint the last completed step and say how to go on.

        The failed step changed neither weights, optimizer nor schedule (the teacher answers before the update), so
        the checkpoint is that step's start: the data position and RNG taken before it. A policy's own state is the
        current one (at most one step of its sampling ahead)."""
        t = self.trainer
        if t.accelerator.num_processes > 1:  # the other processes wait in this step's collectives: no checkpoint now
            return TeacherError(
                f"{error}; continue from the last periodic checkpoint with --resume once the teacher answers again"
            )
        t.state = state
        set_rng_state(rng)
        if self.saved_step != state.step:
            self.save()
        return TeacherError(
            f"{error}; step {state.step} is checkpointed in {self.root}: once the teacher answers again, continue with --resume"
        )

    def restore_data_position(self, batches: Any) -> None:
        """Hand a resumed stream its recorded position; refuse to read one in memory as if it were a batch count."""
        if self.data_position is None:
            return
        load = getattr(batches, "load_state_dict", None)
        if load is None:
            raise CheckpointError(
                f"the checkpoint in {self.root} was written while streaming the data (data.streaming = true); "
                "resume with data.streaming = true, or start afresh in another directory"
            )
        load(self.data_position)

    def resume(self, force: bool) -> dict[str, Any] | None:
        """Restore the newest intact step into the trainer; its manifest's training state, or None for step 0."""
        t = self.trainer
        acc, name = t.accelerator, t.spec.name
        # Every process picks the same step: the newest whose parts (rank 0's and each other rank's) are all intact.
        parts = [self.root / f"rank-{r}" for r in range(1, acc.num_processes)]
        found = latest(self.root, warn=t.console.warn, companions=[p for p in parts if p.is_dir()])
        if found is None:
            if checkpoints(self.root):  # the run got somewhere: step 0 would train over its metrics
                raise CheckpointError(
                    f"every checkpoint under {self.root} is unusable (each named above); restore an intact one, "
                    f"or start afresh in another directory (--set run.output_dir=...)"
                )
            t.console.print(f"{name}: no checkpoint to resume from; starting at step 0")
            t.metrics.truncate(name, 0)  # lines of an attempt that died before its first checkpoint
            return None
        manifest = found.manifest
        if manifest.get("world_size", 1) != acc.num_processes:
            raise CheckpointError(
                f"{found.path} was written by {manifest.get('world_size')} processes but this run has "
                f"{acc.num_processes}; resume with the same number of processes"
            )
        for key, value in t.spec.fingerprints.items():
            saved = manifest.get("fingerprints", {}).get(key)
            if saved is not None and saved != value and not force:
                raise CheckpointError(
                    f"{found.path} was trained with a different {key} ({saved[:12]} vs now {value[:12]}); "
                    f"resuming would mix two setups; pass --force-resume to resume anyway"
                )
        if t.sharded:
            from dskd.run.sharding import load_sharded

            load_sharded(found.path / "sharded", t.model, t.projectors, t.optimizer)
        else:
            load_checkpoint_state(acc.unwrap_model(t.model), found.load("model"))
            t.optimizer.load_state_dict(found.load("optimizer"))
        t.scheduler.load_state_dict(found.load("scheduler"))
        if t.projectors is not None:
            t.projectors.load_state_dict(found.load("objective"))
            t.spec.objective.on_optimizer_step()  # closed-form maps follow the restored student head
        rank = acc.process_index
        if rank == 0:
            rng, policy = found.load("rng"), found.load("policy")
        else:
            own = Loaded(self.root / f"rank-{rank}" / found.path.name, {})
            if (reason := verify(own.path)) is not None:
                raise CheckpointError(
                    f"{own.path}, process {rank}'s part of {found.path.name}, is unusable: {reason}; "
                    f"restore the run's rank-{rank} folder, or run without --resume to start afresh"
                )
            rng, policy = own.load("rng"), own.load("policy")
        part = found if rank == 0 else own  # this process's own files
        self.data_position = part.load("data") if (part.path / "data.pt").exists() else None
        t.spec.policy.load_state_dict(policy)
        set_rng_state(rng)
        state = manifest["state"]
        self.saved_step = state["step"]
        t.metrics.truncate(name, state["step"])
        t.console.print(f"{name}: resumed from {found.path.name} (step {state['step']})")
        return state
