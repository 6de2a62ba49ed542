"""Tokenised rows -> `Batch`: dynamic padding, causal labels, alignment rows; and the resumable batch order.

`collate` pads each model's ids to the longest sequence of the micro-batch (never to a fixed length; the
reference's static 512 spends most FLOPs on padding, DSKD_SPEC §14.24). `ResumableBatchSampler` yields the
same batches for the same seed whatever else draws random numbers, gives each data-parallel rank a disjoint
slice of every global batch, and restarts exactly after the last batch the engine *consumed* (the loader
prefetches ahead, so its own position would skip batches on resume).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from dskd.errors import CheckpointError, DataError
from dskd.types import IGNORE_INDEX, Batch


def _pad(
    sequences: list[list[int]], prompt_lengths: list[int], pad_id: int, masks: list[list[int]] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(input_ids, attention_mask, labels)`, each `(B, T)` with `T = max(len(ids)) - 1`. `masks[b]`, when given
    (conversations), marks which of `ids[prompt_len:]` are labels; the others (a user turn between two assistant
    turns, the template's scaffolding) get -100."""
    width = max(len(ids) for ids in sequences) - 1
    input_ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    labels = np.full((len(sequences), width), IGNORE_INDEX, dtype=np.int64)
    for b, (ids, prompt_len) in enumerate(zip(sequences, prompt_lengths)):
        n = len(ids) - 1
        input_ids[b, :n] = ids[:-1]
        mask[b, :n] = 1
        # Position p predicts ids[p + 1]; the first response token is ids[prompt_len], predicted at prompt_len - 1.
        labels[b, prompt_len - 1 : n] = ids[prompt_len:]
        if masks is not None:
            off = np.flatnonzero(np.asarray(masks[b], dtype=bool) == 0)
            labels[b, prompt_len - 1 + off] = IGNORE_INDEX
    return input_ids, mask, labels


def collate(rows: Sequence[dict[str, Any]], *, student_pad_id: int, teacher_pad_id: int) -> Batch:
    """One micro-batch from rows of `dskd.data.examples.tokenize_split`, with its packed-row indices filled in.

    `alignment` rows are `(b, teacher_label_position, student_label_position)`, where a label position is
    `prompt_len - 1 + label_index`: the position whose hidden state predicts that label token.
    """
    s_ids = [list(r["student_ids"]) for r in rows]
    t_ids = [list(r["teacher_ids"]) for r in rows]
    s_prompt = [int(r["student_prompt_len"]) for r in rows]
    t_prompt = [int(r["teacher_prompt_len"]) for r in rows]
    masked = bool(rows) and "student_label_mask" in rows[0]
    s_input, s_mask, s_labels = _pad(
        s_ids, s_prompt, student_pad_id, [r["student_label_mask"] for r in rows] if masked else None
    )
    t_input, t_mask, t_labels = _pad(
        t_ids, t_prompt, teacher_pad_id, [r["teacher_label_mask"] for r in rows] if masked else None
    )
    alignment = None
    if rows and "alignment" in rows[0]:
        blocks = []
        for b, row in enumerate(rows):
            pairs = np.asarray(row["alignment"], dtype=np.int64).reshape(-1, 2)
            blocks.append(
                np.column_stack([np.full(len(pairs), b), pairs[:, 0] + t_prompt[b] - 1, pairs[:, 1] + s_prompt[b] - 1])
            )
        alignment = torch.from_numpy(np.concatenate(blocks).astype(np.int64).reshape(-1, 3))
    batch = Batch(
        student_input_ids=torch.from_numpy(s_input),
        student_attention_mask=torch.from_numpy(s_mask),
        student_labels=torch.from_numpy(s_labels),
        teacher_input_ids=torch.from_numpy(t_input),
        teacher_attention_mask=torch.from_numpy(t_mask),
        teacher_labels=torch.from_numpy(t_labels),
        alignment=alignment,
        student_prompt_lengths=torch.tensor(s_prompt, dtype=torch.int64),
        teacher_prompt_lengths=torch.tensor(t_prompt, dtype=torch.int64),
        sample_ids=torch.tensor([int(r["sample_id"]) for r in rows], dtype=torch.int64),
    )
    return batch.index_rows()


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices for one rank, in a fixed order per `(seed, epoch)`, over endless epochs.

    A global batch is `batch_size * world_size` consecutive indices of the epoch's permutation; rank `r` gets
    its `r`-th slice. With `drop_last`, an epoch's incomplete last global batch is skipped. Without it, one
    process gets a short last batch; several get it topped up from the start of the permutation (as
    `DistributedSampler` does), so every rank has the same number of equal-sized batches and no collective
    waits for a missing one.

    Resume: `state_dict(batches_consumed)` records where the *next* batch starts, as counted by the caller;
    `load_state_dict` (or `start_batch`) continues from there. Iteration begins at that batch every time.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
        infinite: bool = True,
        start_batch: int = 0,
    ) -> None:
        if not 0 <= rank < world_size:
            raise DataError(
                f"data-parallel rank {rank} is outside [0, {world_size}); launch with accelerate so each process gets its rank"
            )
        global_size = batch_size * world_size
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.shuffle, self.drop_last, self.rank, self.world_size, self.infinite = (
            shuffle,
            drop_last,
            rank,
            world_size,
            infinite,
        )
        self.batches_per_epoch = num_samples // global_size if drop_last else math.ceil(num_samples / global_size)
        if self.batches_per_epoch == 0:
            raise DataError(
                f"the split has {num_samples} samples, fewer than one global batch of {global_size} "
                f"(batch size {batch_size} x {world_size} processes); lower train.batch_size or add samples"
            )
        self.start_batch = start_batch

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return self.batches_per_epoch

    def permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        # A private generator seeded from (seed, epoch): the order never depends on who else drew random
        # numbers (model init, dropout, sampling), and different seeds give unrelated orders.
        generator = torch.Generator().manual_seed(
            int.from_bytes(hashlib.sha256(f"{self.seed}:{epoch}".encode()).digest()[:8], "little")
        )
        return torch.randperm(self.num_samples, generator=generator)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of one epoch, in order."""
        order = self.permutation(epoch)
        if self.world_size == 1:  # one process: a short last batch is fine, and nothing is repeated
            return [b.tolist() for b in order.split(self.batch_size)[: self.batches_per_epoch]]
        global_size = self.batch_size * self.world_size
        used = self.batches_per_epoch * global_size
        if used > self.num_samples:
            order = order.repeat(math.ceil(used / self.num_samples))
        per_rank = order[:used].reshape(self.batches_per_epoch, self.world_size, self.batch_size)
        return per_rank[:, self.rank].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            yield from self.epoch_batches(epoch)[offset:]
            if not self.infinite:
                return
            epoch, offset = epoch + 1, 0

    def state_dict(self, batches_consumed: int) -> dict[str, int]:
        """What a checkpoint stores: the position after `batches_consumed` batches (counted from the start of
        training, this rank's batches; equal on every rank) and the settings it is only valid for."""
        epoch, batch_in_epoch = divmod(batches_consumed, self.batches_per_epoch)
        return {
            "batches_consumed": batches_consumed,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "shuffle": int(self.shuffle),
            "drop_last": int(self.drop_last),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue after the batches recorded in `state`; refuses a state made with different settings."""
        for key in ("seed", "num_samples", "batch_size", "world_size", "shuffle", "drop_last"):
            mine = int(getattr(self, key))
            if int(state[key]) != mine:
                raise CheckpointError(
                    f"the data order in the checkpoint was made with {key} = {state[key]}, this run has {mine}; "
                    f"resume with the same {key} (and data), or start a new run"
                )
        self.start_batch = int(state["batches_consumed"])


def make_loader(
    dataset: Any,
    sampler: Sampler[list[int]],
    collate_fn: Callable[[list[dict[str, Any]]], Batch],
    num_workers: int = 0,
) -> DataLoader:
    """A `DataLoader` over `dataset` in the order of `sampler`, collating in `num_workers` processes."""
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,  # workers survive epochs; the sampler is endless anyway
    )
