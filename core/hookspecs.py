"""The plugin hooks of dskd: one per plugin family, each receiving a `register(name, obj)` callback.

Hooks run once, when `dskd.load_registry()` builds the registry at setup; the training step never calls a
hook. A plugin implements any subset of them with `@dskd.hookimpl`:

    import dskd

    @dskd.hookimpl
    def dskd_register_divergences(register):
        register("my_kl", my_kl)

Calling conventions of what is registered (public API, ARCHITECTURE §3):

- divergence: `fn(student_logits, teacher_logits, *, temperature=1.0, **options) -> (N,) float32`
- aligner: `factory(teacher_tokenizer, student_tokenizer, **options)` -> a `dskd.kit.Aligner`
  (`align(teacher_ids, student_ids) -> Alignment`, optional `vocab_map()`, `fingerprint`)
- policy: `factory(context, **options)` -> a `dskd.kit.Policy` (`prepare(batch, step) -> list[Batch]`, ...)
- objective: `factory(context, **options)` -> a `dskd.kit.Objective`
  (`compute(batch, student_hidden, signal) -> LossTerms` of unweighted parts, ...)

docs/plugins.md lists every optional member and the factory declarations (`dskd.registry.DECLARATIONS`).

Options are the keyword parameters with defaults of `fn` / `factory`; the config validates them by name and
by the type of their defaults, so a plugin declares its options simply by writing its signature.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "dskd"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[[str, Any], None]


@hookspec
def dskd_register_divergences(register: Register) -> None:
    """Register divergences: `register(name, fn)`.

    `fn(student_logits, teacher_logits, *, temperature=1.0, **options)` takes two float tensors of shape
    `(N, V)` (rows already aligned and masked by the caller), divides both by `temperature`, and returns the
    per-row loss, shape `(N,)`, in float32. Set `fn.accepts_sparse_teacher = True` if it also accepts a
    `dskd.SparseTeacher` (top-k ids and log-probabilities plus tail mass) in place of dense teacher logits.
    """


@hookspec
def dskd_register_aligners(register: Register) -> None:
    """Register token aligners: `register(name, factory)`.

    `factory(teacher_tokenizer, student_tokenizer, **options)` returns a picklable object whose
    `align(teacher_ids, student_ids)` returns a `dskd.Alignment` with `pairs` of shape `(K, 2)`
    (teacher position, student position), both columns strictly increasing. It runs in data-loader workers.
    """


@hookspec
def dskd_register_policies(register: Register) -> None:
    """Register policies (which sequences are distilled at each step): `register(name, factory)`."""


@hookspec
def dskd_register_objectives(register: Register) -> None:
    """Register objectives (student and teacher signals -> per-token losses): `register(name, factory)`."""
