"""The training split as a stream: read in order, tokenised and aligned on the fly, resumable at its position.

With `data.streaming = true` the rows of `data.train` are never held in memory: `dskd.data.sources.open_stream`
reads them as an `IterableDataset` (this data-parallel rank's part only), micro-batch by micro-batch. Each
micro-batch goes through the same steps as the in-memory path: `RowConverter` (row -> `Example`), `_PairEncoder`
(both tokenizations and the alignment) and `collate`, so a stream and an in-memory split in the same order give
identical batches.

Work is spread over `DataLoader` worker processes by micro-batch: with `W` workers, worker `w` encodes micro-batches
`w, w + W, ...` and skips the others as Arrow tables (never turned into Python), and the `DataLoader` hands them
back round-robin, that is, in stream order. Every worker reads the same stream, so each knows the stream's
position after each micro-batch (`IterableDataset.state_dict()`) and sends it along with the batch. The main
process keeps those positions by batch count, so a checkpoint records the position after exactly the batches the
engine consumed (the loader runs ahead of it), and resume starts the stream there (`load_state_dict`): the rows
before it are neither converted nor tokenised again.

A short last micro-batch ends the stream (as `drop_last` does in memory). When any data-parallel rank runs out,
all stop at the same micro-batch (one small collective per micro-batch), and the engine checkpoints and raises
`DataExhausted`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dskd.config import DataConfig
from dskd.data.examples import RowConverter, _PairEncoder, encoder_columns
from dskd.data.sources import open_stream
from dskd.errors import CheckpointError, DataError, DataExhausted, DskdError
from dskd.types import Batch

KEEP_POSITIONS = 64  # stream positions remembered behind the newest batch (the engine is at most a step behind)


@dataclass(frozen=True)
class StreamSpec:
    """What identifies one rank's stream; a checkpoint's position is only valid for the same spec."""

    source: str  # the data.<split> value
    data: DataConfig
    split: str
    batch_size: int
    rank: int = 0
    world_size: int = 1

    def identity(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "subset": self.data.subset,
            "split_name": self.data.split,
            "data_files": list(self.data.data_files),
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "rank": self.rank,
        }


def _unchanged(item: Any) -> Any:
    return item  # module-level, so worker processes can unpickle it


class _Failure:
    """A `DskdError` raised in a worker, sent back as data: the `DataLoader` would re-raise it as a multi-line
    message with the worker's traceback, and dskd's errors are one line."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class EncodedStream(IterableDataset):
    """Yields `(batch_number, Batch, stream_position_after_it)` in stream order (see the module doc)."""

    def __init__(
        self,
        spec: StreamSpec,
        student_tokenizer: Any,
        teacher_tokenizer: Any | None,
        aligner: Any | None,
        collate_fn: Callable[[list[dict[str, Any]]], Batch],
        *,
        start_batch: int = 0,
        start_position: dict[str, Any] | None = None,
    ) -> None:
        self.spec = spec
        self.encoder = _PairEncoder(student_tokenizer, teacher_tokenizer, spec.data, aligner, spec.split)
        self.collate_fn = collate_fn
        self.start_batch = start_batch
        self.start_position = start_position

    def __iter__(self) -> Iterator[tuple[int, Batch, dict[str, Any]] | _Failure]:
        info = get_worker_info()
        workers, me = (info.num_workers, info.id) if info is not None else (1, 0)
        try:
            yield from self._batches(workers, me)
        except DskdError as error:
            yield _Failure(error)

    def _batches(self, workers: int, me: int) -> Iterator[tuple[int, Batch, dict[str, Any]]]:
        spec, size = self.spec, self.spec.batch_size
        stream = open_stream(spec.source, spec.data, spec.split, rank=spec.rank, world_size=spec.world_size)
        if self.start_position is not None:
            stream.load_state_dict(self.start_position)
        convert = None
        for k, table in enumerate(stream.iter(batch_size=size)):
            if table.num_rows < size:
                return
            if k % workers != me:
                continue
            position = stream.state_dict()  # after this micro-batch: read before the stream moves on
            if convert is None:
                convert = RowConverter(spec.data, f"data.{spec.split} ({spec.source})", tuple(table.column_names))
            _refuse_mixed_json(table, spec, number_of_first_row=(self.start_batch + k) * size)
            number = self.start_batch + k
            # Sample ids count this rank's rows from the start of training, as the in-memory split's indices do.
            ids = list(range(number * size, (number + 1) * size))
            examples = [convert(row, index) for row, index in zip(table.to_pylist(), ids)]
            encoded = self.encoder(encoder_columns(examples, ids))
            rows = [dict(zip(encoded, values)) for values in zip(*encoded.values())]
            yield number, self.collate_fn(rows), position


def _refuse_mixed_json(table: Any, spec: StreamSpec, number_of_first_row: int) -> None:
    """A JSON field that holds different types (a string in some records, a list in others) is typed `Json`,
    whose values come back as JSON text with strings that look like JSON unquoted ("5" and 5 alike): the in-memory
    reader re-reads such files with the json module, a stream cannot, so it says so rather than guess."""
    cfg = spec.data
    for name in (cfg.prompt_field or cfg.instruction_field, cfg.context_field, cfg.response_field):
        if (
            name
            and name in table.column_names
            and getattr(table.schema.field(name).type, "extension_name", "") == "arrow.json"
        ):
            raise DataError(
                f"data.{spec.split} ({spec.source}), samples {number_of_first_row}-{number_of_first_row + table.num_rows - 1}: "
                f"field {name!r} holds values of different JSON types (e.g. strings and lists), which a stream cannot "
                "read back exactly; store one type in every record (e.g. every response a list), or set data.streaming = false"
            )


class StreamBatches:
    """The engine's batch iterator over a stream (`StageSpec.make_batches` returns one), with the checkpoint
    hooks: `state_dict(consumed)` is the position after `consumed` batches, `load_state_dict` resumes there.

    `agree(has_batch) -> bool` makes data-parallel ranks stop together (True only when every rank has one)."""

    def __init__(
        self,
        spec: StreamSpec,
        student_tokenizer: Any,
        teacher_tokenizer: Any | None,
        aligner: Any | None,
        collate_fn: Callable[[list[dict[str, Any]]], Batch],
        *,
        consumed: int = 0,
        num_workers: int = 0,
        agree: Callable[[bool], bool] | None = None,
    ) -> None:
        self.spec = spec
        self._parts = (student_tokenizer, teacher_tokenizer, aligner, collate_fn)
        self.num_workers = num_workers
        self.agree = agree
        self.start = consumed
        self.next_number = consumed
        # position after n batches (None: the start of the stream; unknown for a resumed count until loaded)
        self._positions: dict[int, dict[str, Any] | None] = {0: None} if consumed == 0 else {}
        self._iterator: Iterator[Any] | None = None

    def state_dict(self, consumed: int) -> dict[str, Any]:
        if consumed not in self._positions:
            raise CheckpointError(
                f"no stream position is known for {consumed} consumed batches (known: {sorted(self._positions)[:4]}...); "
                "this is a bug in dskd, please report it"
            )
        return {"kind": "stream", "batches": consumed, "position": self._positions[consumed], **self.spec.identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume after the batches recorded in `state`; refuses a position of another stream."""
        if self._iterator is not None:
            raise RuntimeError("load_state_dict must be called before the first batch is taken")
        if state.get("kind") != "stream":
            raise CheckpointError(
                "the checkpoint holds no stream position (it was written with data.streaming = false); "
                "resume with the same data.streaming, or start afresh in another directory"
            )
        for key, mine in self.spec.identity().items():
            if state.get(key) != mine:
                raise CheckpointError(
                    f"the stream position in the checkpoint was recorded with {key} = {state.get(key)!r}, this run has "
                    f"{mine!r}; resume with the same data and {key}, or start afresh in another directory"
                )
        if int(state["batches"]) != self.start:
            raise CheckpointError(
                f"the checkpoint's stream position is after {state['batches']} batches but its training state after "
                f"{self.start}; the checkpoint is inconsistent, resume from another one"
            )
        self._positions = {self.start: state["position"]}

    def __iter__(self) -> StreamBatches:
        return self

    def __next__(self) -> Batch:
        if self._iterator is None:
            self._iterator = self._open()
        try:
            item = next(self._iterator)
        except StopIteration:
            item = None
        if isinstance(item, _Failure):
            raise item.error
        has_batch = item is not None
        if self.agree is not None:
            has_batch = self.agree(has_batch)
        if not has_batch:
            self._iterator = iter(())  # every later call ends the same way
            rows = self.next_number * self.spec.batch_size
            part = f", this process's part of {self.spec.world_size}" if self.spec.world_size > 1 else ""
            raise DataExhausted(
                f"data.{self.spec.split} ({self.spec.source}) ended after {self.next_number} batches of "
                f"{self.spec.batch_size} ({rows} samples{part}), before train.max_steps"
            )
        number, batch, position = item
        if number != self.next_number:  # the DataLoader keeps order; a gap would mean lost or repeated data
            raise DataError(f"data.{self.spec.split}: stream batch {number} arrived where {self.next_number} was due")
        self.next_number += 1
        self._positions[self.next_number] = position
        for old in [n for n in self._positions if n < self.next_number - KEEP_POSITIONS]:
            del self._positions[old]
        return batch

    def _open(self) -> Iterator[Any]:
        if self.start not in self._positions:
            raise CheckpointError(
                f"the checkpoint is {self.start} batches into data.{self.spec.split} but holds no stream position "
                "(written with data.streaming = false); resume with the same data.streaming, or start afresh"
            )
        dataset = EncodedStream(
            self.spec, *self._parts, start_batch=self.start, start_position=self._positions[self.start]
        )
        loader = DataLoader(
            dataset,
            batch_size=None,
            collate_fn=_unchanged,
            num_workers=self.num_workers,
            prefetch_factor=4 if self.num_workers else None,
        )
        return iter(loader)


def rank_agreement(accelerator: Any) -> Callable[[bool], bool] | None:
    """`agree` for several data-parallel processes: True when every process has a batch (None for one)."""
    if accelerator.num_processes <= 1:
        return None

    def agree(has_batch: bool) -> bool:
        flag = torch.tensor([1.0 if has_batch else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() == accelerator.num_processes)

    return agree
