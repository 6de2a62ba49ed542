"""Thread defaults of `dskd` commands (`dskd.run.threads`): one torch thread per usable core unless the user
chose."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from dskd.run.threads import apply_thread_defaults, choose_threads, usable_cores


def test_threads_follow_the_usable_cores_not_the_machine():
    chosen = choose_threads({}, torch_default=8, cores=2)
    assert chosen.threads == 2
    assert choose_threads({}, torch_default=1, cores=4).threads == 1  # never more than torch would start


def test_a_user_choice_is_left_alone():
    chosen = choose_threads({"OMP_NUM_THREADS": "3"}, torch_default=8, cores=2)
    assert chosen.threads is None


def test_apply_sets_torch_threads():
    before = torch.get_num_threads()
    try:
        chosen = apply_thread_defaults({})
        assert chosen.threads == min(before, usable_cores()) == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_a_process_pinned_to_one_core_gets_one_thread():
    if not hasattr(os, "sched_setaffinity"):
        return
    code = (
        "import os, torch; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
        "from dskd.run.threads import apply_thread_defaults; apply_thread_defaults(); print(torch.get_num_threads())"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "1"
