"""CPU thread defaults for `dskd` commands: one intra-op thread per core this process may run on.

torch sizes its thread pool from the machine's cores, not from the cores this process may run on: in a
container or under `taskset` it can start more threads than it has cores, and then every parallel op ends in
a barrier that waits for a thread that is not running. On cores that another process also uses the same
barrier waits for the slowest thread, so a step made of many small ops slows down far more than its work;
dskd keeps the ops few (the fused divergences of `dskd.kit.probability`) and sets here:

- **threads** = the cores this process may run on (`os.sched_getaffinity`), at most torch's own default,
  unless the user chose (`OMP_NUM_THREADS`, or `torch.set_num_threads` after the command started).

The OpenMP wait policy is left alone: against a busy-loop neighbour `OMP_WAIT_POLICY=PASSIVE` made no
difference beyond the noise in `benchmarks/bench_vs_trl.py`, and it is read once, when torch is imported, so a
command could not change it for itself anyway (README, "Threads"; docs/protocol.md keeps recommending it for a
teacher server that shares the trainer's cores).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ThreadDefaults:
    """What `apply_thread_defaults` chose: `threads` for torch (None: left as the user set it) and why."""

    threads: int | None
    reason: str


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), or all of them where affinity is unknown."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def choose_threads(environ: Mapping[str, str], torch_default: int, cores: int) -> ThreadDefaults:
    """The thread count for a `dskd` command (pure: the environment, torch's default and the usable cores)."""
    if environ.get("OMP_NUM_THREADS"):
        return ThreadDefaults(None, "OMP_NUM_THREADS is set")
    threads = max(1, min(torch_default, cores))
    return ThreadDefaults(threads, "one per usable core" if threads == cores else "torch's default")


def apply_thread_defaults(environ: Mapping[str, str] | None = None) -> ThreadDefaults:
    """Set torch's intra-op thread count for this command; returns what was chosen."""
    import torch

    chosen = choose_threads(os.environ if environ is None else environ, torch.get_num_threads(), usable_cores())
    if chosen.threads is not None and chosen.threads != torch.get_num_threads():
        torch.set_num_threads(chosen.threads)
    return chosen
