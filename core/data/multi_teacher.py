"""Data for several teachers (`[[teachers]]`): which teacher serves which sample, the per-teacher tokenised splits
combined by sample index, and micro-batches that carry each teacher's part (`Batch.teachers`).

Each teacher's split comes from the single-teacher pipeline (`tokenize_split`, cached by tokenizer and aligner),
so its ids, labels, prompt length and alignment with the student are exactly those a one-teacher job would use;
the student side is the same text in every split, so the splits line up sample by sample. A micro-batch is the
first teacher's batch of all its samples (what single-teacher code reads) plus, per teacher, its served samples
split into groups of samples served by the same set of teachers, each with that teacher's normalised weight.
Everything is computed on the host, in the loader, so the loss never needs a data-dependent shape on the device.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dskd.data.batching import collate
from dskd.errors import DataError
from dskd.types import IGNORE_INDEX, Batch, ServedGroup, TeacherView


def serving_sets(entries: Sequence[Any], examples: Sequence[Any], split: str = "train") -> list[tuple[str, ...]]:
    """For each example, the names of the teachers that serve it (in the job's order); a route value that matches no
    sample, a sample no teacher serves and a sample whose teachers all weigh 0 are one-line `DataError`s."""
    tags = [dict(example.tags) for example in examples]
    for entry in entries:
        for pattern in entry.route_values:
            if not any(
                fnmatch.fnmatchcase(t.get(entry.route_field, ""), pattern) for t in tags if entry.route_field in t
            ):
                raise DataError(
                    f"teachers.{entry.name}.route: {entry.route_field} = {pattern!r} matches no sample of data.{split}; "
                    f"fix the value (values present: {_present(tags, entry.route_field)})"
                )
    out = []
    for index, t in enumerate(tags):
        names = tuple(entry.name for entry in entries if entry.serves(t))
        if not names:
            fields = sorted({e.route_field for e in entries if e.route})
            shown = ", ".join(f"{f} = {t.get(f)!r}" for f in fields)
            raise DataError(
                f"data.{split}, sample {index} ({shown}): no teacher serves it; add its value to a route, or add a "
                f"teacher without a route"
            )
        if sum(entry.weight for entry in entries if entry.name in names) <= 0:
            raise DataError(
                f"data.{split}, sample {index}: every teacher that serves it ({', '.join(names)}) has weight 0; give one "
                f"of them weight > 0"
            )
        out.append(names)
    return out


def _present(tags: list[dict[str, str]], field: str, most: int = 8) -> str:
    values = sorted({t[field] for t in tags if field in t})
    if not values:
        return f"none: no sample has the field {field!r}"
    return ", ".join(values[:most]) + (f" and {len(values) - most} more" if len(values) > most else "")


class MultiTeacherDataset(torch.utils.data.Dataset):
    """Rows of every teacher's tokenised split for one sample index, with the names of the teachers serving it."""

    def __init__(self, splits: dict[str, Any], serving: list[tuple[str, ...]]) -> None:
        lengths = {name: len(split) for name, split in splits.items()}
        if len(set(lengths.values()) | {len(serving)}) != 1:
            raise DataError(f"the teachers' tokenised splits differ in length ({lengths}); clear data.cache_dir")
        self.splits = splits
        self.serving = serving
        first = next(iter(splits.values()))
        self.column_names = first.column_names
        # Counted over every pair: a sample whose text a tokenizer pair disagrees about (logged per teacher).
        self.text_differs = {
            name: sum(split["text_differs"]) for name, split in splits.items() if "text_differs" in split.column_names
        }

    def __len__(self) -> int:
        return len(self.serving)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"rows": {name: split[index] for name, split in self.splits.items()}, "serving": self.serving[index]}


def collate_teachers(
    rows: Sequence[dict[str, Any]],
    *,
    student_pad_id: int,
    teacher_pad_ids: dict[str, int],
    weights: dict[str, float],
) -> Batch:
    """A micro-batch of `MultiTeacherDataset` rows: the first teacher's batch of every sample, with `teachers` set."""
    names = list(teacher_pad_ids)
    full = {
        name: collate(
            [row["rows"][name] for row in rows], student_pad_id=student_pad_id, teacher_pad_id=teacher_pad_ids[name]
        )
        for name in names
    }
    serving = [set(row["serving"]) for row in rows]
    views: dict[str, TeacherView] = {}
    for name in names:
        served = [b for b in range(len(rows)) if name in serving[b]]
        if not served or weights[name] <= 0:  # a teacher of weight 0 adds nothing: not even asked
            continue
        view = select_samples(full[name], served)
        by_set: dict[frozenset, list[int]] = {}
        for position, b in enumerate(served):
            by_set.setdefault(frozenset(serving[b]), []).append(position)
        groups = []
        for teachers, positions in by_set.items():
            weight = weights[name] / sum(weights[t] for t in teachers)
            whole = len(positions) == len(served)
            groups.append(
                ServedGroup(
                    weight=weight,
                    batch=view if whole else select_samples(view, positions),
                    samples=torch.tensor([served[p] for p in positions], dtype=torch.int64),
                    signal_rows=None if whole else signal_rows(view, positions),
                )
            )
        views[name] = TeacherView(view, torch.tensor(served, dtype=torch.int64), groups)
    batch = full[names[0]]
    batch.teachers = views
    return batch


def select_samples(batch: Batch, positions: Sequence[int]) -> Batch:
    """The samples at `positions` of `batch`, rows indexed again. The student fields keep their width (the student's
    hidden states of the parent batch are selected by sample, not re-padded); the teacher fields are trimmed to the
    longest selected sequence."""
    index = torch.as_tensor(list(positions), dtype=torch.int64)
    width = max(int(batch.teacher_attention_mask.index_select(0, index).sum(1).max()), 1)
    alignment = None
    if batch.alignment is not None:
        a = batch.alignment
        new_index = torch.full((batch.size,), -1, dtype=torch.int64)
        new_index[index] = torch.arange(len(index))
        keep = new_index[a[:, 0]] >= 0
        alignment = torch.cat([new_index[a[keep, 0]].unsqueeze(1), a[keep, 1:]], dim=1)
        # Order by the new batch index (positions need not be increasing), each sample's pairs kept in order.
        alignment = alignment[torch.argsort(alignment[:, 0], stable=True)]

    def pick(t: torch.Tensor | None, trim: bool = False) -> torch.Tensor | None:
        if t is None:
            return None
        t = t.index_select(0, index)
        return t[:, :width].contiguous() if trim else t

    return Batch(
        student_input_ids=pick(batch.student_input_ids),
        student_attention_mask=pick(batch.student_attention_mask),
        student_labels=pick(batch.student_labels),
        teacher_input_ids=pick(batch.teacher_input_ids, True),
        teacher_attention_mask=pick(batch.teacher_attention_mask, True),
        teacher_labels=pick(batch.teacher_labels, True),
        alignment=alignment,
        student_prompt_lengths=pick(batch.student_prompt_lengths),
        teacher_prompt_lengths=pick(batch.teacher_prompt_lengths),
        sample_ids=pick(batch.sample_ids),
        ce=batch.ce,
        kd=batch.kd,
    ).index_rows()


def signal_rows(view: Batch, positions: Sequence[int]) -> torch.Tensor:
    """Rows of a teacher signal for `view` (its valid label positions, row-major) that belong to the sequences at
    `positions`, in that order."""
    counts = (view.teacher_labels != IGNORE_INDEX).sum(1).numpy()
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rows = [np.arange(starts[p], starts[p] + counts[p]) for p in positions]
    return torch.from_numpy(np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, dtype=np.int64))


def select_signal(signal: Any, group: ServedGroup) -> Any:
    """The part of a view's teacher signal (`TeacherSignal`) for one group's sequences: its `signal_rows` of every
    per-row field, and the group batch's own row counts (the same sequences' valid teacher labels)."""
    import dataclasses

    if group.signal_rows is None:
        return signal
    rows = group.signal_rows
    moved = {"rows_per_sequence": (group.batch.teacher_labels != IGNORE_INDEX).sum(1)}
    for f in dataclasses.fields(signal):
        value = getattr(signal, f.name)
        if f.name == "rows_per_sequence":
            continue
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            moved[f.name] = value.index_select(0, rows.to(value.device))
    return dataclasses.replace(signal, **moved)
