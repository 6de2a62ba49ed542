"""CPU thread defaults for `dskd` commands: how many intra-op threads, and how idle OpenMP threads wait.

torch sizes its thread pool from the machine's cores, not from the cores this process may run on: in a
container or under `taskset` it can start more threads than it has cores, and every parallel op then waits
for a thread that is not running. And on cores that another process also uses, each parallel region ends
in a barrier that waits for the slowest thread, so a step made of many small ops slows down far more than
the work alone explains. dskd keeps the ops few (the fused divergences, `dskd.kit.probability`), and here:

- **threads** = the cores this process may run on (`os.sched_getaffinity`), at most torch's own default,
  unless the user chose (`OMP_NUM_THREADS`, or `torch.set_num_threads` before calling in from Python);
- **`OMP_WAIT_POLICY=PASSIVE`** for the processes dskd starts (teacher servers, launched ranks) unless set:
  an idle OpenMP thread then sleeps instead of spinning, so it does not take the core from a busy neighbour
  (the co-located teacher server, another job). The OpenMP runtime reads this once, when torch is imported,
  so it cannot change the running process: export it in the shell for the `dskd` process itself
  (README, "Threads").
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ThreadDefaults:
    """What `apply_thread_defaults` chose: `threads` for torch (None: left as the user set it) and why."""

    threads: int | None
    reason: str
    wait_policy: str


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), or all of them where affinity is unknown."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def choose_threads(environ: MutableMapping[str, str], torch_default: int, cores: int) -> ThreadDefaults:
    """The thread count for a `dskd` command (pure: the environment, torch's default and the usable cores)."""
    wait_policy = environ.get("OMP_WAIT_POLICY", "PASSIVE")
    if environ.get("OMP_NUM_THREADS"):
        return ThreadDefaults(None, "OMP_NUM_THREADS is set", wait_policy)
    threads = max(1, min(torch_default, cores))
    reason = "one per usable core" if threads == cores else "torch's default, below the usable cores"
    return ThreadDefaults(threads, reason, wait_policy)


def apply_thread_defaults(environ: MutableMapping[str, str] | None = None) -> ThreadDefaults:
    """Set torch's thread count and the wait policy inherited by child processes; returns what was chosen."""
    import torch

    environ = os.environ if environ is None else environ
    chosen = choose_threads(environ, torch.get_num_threads(), usable_cores())
    if chosen.threads is not None and chosen.threads != torch.get_num_threads():
        torch.set_num_threads(chosen.threads)
    environ.setdefault("OMP_WAIT_POLICY", chosen.wait_policy)
    return chosen
