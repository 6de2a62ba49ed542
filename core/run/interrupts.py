"""Ctrl-C or SIGTERM (a preempted job) during a training stage: finish the step, checkpoint it, then stop."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def stop_requests(stage: str, num_processes: int) -> Iterator[threading.Event]:
    """An event set by the first signal; a second signal stops at once. Only in a single process: under a launcher
    the processes would see the signal at different steps, and a checkpoint needs all of them at the same one."""
    requested = threading.Event()
    if num_processes > 1 or threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum, frame) -> None:
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()
        sys.stderr.write(f"{stage}: stopping after this step to checkpoint it (signal again to stop at once)\n")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
