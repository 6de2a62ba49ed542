"""What a divergence or an aligner returns, checked against its contract (ARCHITECTURE §3) where it is used.

A plugin that breaks its contract otherwise fails far from its own code: a divergence returning a scalar trains
silently with the wrong weighting, one returning `(N, V)` dies in a broadcast deep inside an objective, and an
aligner's out-of-range pairs index past a sequence on the first on-policy step. The wrappers here turn each of
those into one sentence that names the plugin and the package it came from.

The divergence's output is checked on its first call only: its shape and dtype cannot change between calls, and
checking them again would cost a Python branch per loss chunk for nothing. An aligner's pairs depend on the
texts it is given (student samples are arbitrary text), so every alignment is checked; that is a few NumPy
reductions on the host over arrays the aligner has just built, no device work.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from dskd.errors import PluginError


def describe(registry: Any, family: str, name: str) -> str:
    """`divergence 'x' (plugin 'p', package 'pkg')`: how an error names a registered plugin."""
    from dskd.registry import SINGULAR

    registration = registry.registrations.get((family, name))
    if registration is None:  # registered outside the registry (tests wiring objects by hand)
        return f"{SINGULAR[family]} {name!r}"
    return f"{SINGULAR[family]} {name!r} (plugin {registration.plugin!r}, package {registration.package!r})"


def checked_divergence(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
    """`fn`, whose first result is checked: a floating-point tensor of shape `(N,)` for `N` student rows that
    keeps the graph to the student's logits. Attributes of `fn` (e.g. `accepts_sparse_teacher`) and its
    signature (read for its options) carry over."""
    checked = False

    @functools.wraps(fn)
    def divergence(student_logits, teacher_logits, *args, **kwargs):
        nonlocal checked
        out = fn(student_logits, teacher_logits, *args, **kwargs)
        if not checked:
            _check_divergence_output(out, student_logits, label)
            checked = True
        return out

    return divergence


def _check_divergence_output(out: Any, student_logits: torch.Tensor, label: str) -> None:
    rows = tuple(student_logits.shape[:1])
    inputs = f"for ({', '.join(str(n) for n in student_logits.shape)}) logits"
    expected = f"a divergence returns the per-row loss, a float tensor of shape ({rows[0]},)"
    if not isinstance(out, torch.Tensor):
        raise PluginError(f"{label} returned {type(out).__name__} {inputs}; {expected}")
    if tuple(out.shape) != rows:
        hint = " (a scalar: drop the .mean() or .sum() over rows)" if out.ndim == 0 else ""
        raise PluginError(f"{label} returned shape {tuple(out.shape)}{hint} {inputs}; {expected}")
    if not out.is_floating_point():
        raise PluginError(f"{label} returned dtype {out.dtype} {inputs}; {expected}")
    if torch.is_grad_enabled() and student_logits.requires_grad and not out.requires_grad:
        raise PluginError(
            f"{label} returned a loss detached from the student's logits, so the student would never learn from it; "
            "compute it with torch operations on the logits it is given (no .detach(), .item() or NumPy)"
        )


class CheckedAligner:
    """An aligner whose every `align` result is checked against the contract; all else is the aligner's own.

    Picklable (data-loader workers receive it) and with the aligner's own fingerprint, so wrapping it changes
    no data cache key.
    """

    def __init__(self, aligner: Any, label: str) -> None:
        self.aligner = aligner
        self.label = label

    def align(self, teacher_ids, student_ids):
        alignment = self.aligner.align(teacher_ids, student_ids)
        check_pairs(getattr(alignment, "pairs", None), len(teacher_ids), len(student_ids), self.label)
        return alignment

    @property
    def fingerprint(self) -> str:
        from dskd.data.examples import (
            aligner_fingerprint,  # dskd.data.examples imports the tokenizer stack; only needed here
        )

        return aligner_fingerprint(self.aligner)

    def __getattr__(self, name: str) -> Any:
        # Only reached for names the wrapper lacks (e.g. `vocab_map`). The guard keeps unpickling, which looks
        # attributes up before `__init__` ran, from recursing into a missing `self.aligner`.
        if name in ("aligner", "label") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.aligner, name)

    def __repr__(self) -> str:
        return repr(self.aligner)


def check_pairs(pairs: Any, n_teacher: int, n_student: int, label: str) -> None:
    """Raise a `PluginError` naming `label` unless `pairs` is an integer `(K, 2)` array of (teacher position,
    student position) rows, each column strictly increasing, inside the two sequences."""
    where = f"for {n_teacher} teacher and {n_student} student tokens"
    contract = (
        "an aligner returns an Alignment whose pairs are integer (teacher_position, student_position) rows, "
        "both columns strictly increasing, inside the two sequences"
    )
    if pairs is None:
        raise PluginError(f"{label} returned no `pairs` {where}; {contract}")
    array = pairs.detach().cpu().numpy() if isinstance(pairs, torch.Tensor) else np.asarray(pairs)
    if array.size == 0:
        return
    if array.ndim != 2 or array.shape[1] != 2:
        raise PluginError(f"{label} returned pairs of shape {array.shape} {where}; {contract}")
    if array.dtype.kind not in "iu":
        raise PluginError(f"{label} returned pairs of dtype {array.dtype} {where}; {contract}")
    low = int(array.min())
    if low < 0:
        raise PluginError(f"{label} returned a negative position ({low}) {where}; {contract}")
    if int(array[:, 0].max()) >= n_teacher or int(array[:, 1].max()) >= n_student:
        raise PluginError(
            f"{label} returned a position past the end (teacher {int(array[:, 0].max())}, student "
            f"{int(array[:, 1].max())}) {where}; {contract}"
        )
    if len(array) > 1 and not bool(np.all(np.diff(array, axis=0) > 0)):
        raise PluginError(f"{label} returned pairs that are not strictly increasing down the rows {where}; {contract}")
