"""Joining the processes a launcher started: one `accelerate.Accelerator` per process, on CPU-only machines too.

accelerate forms a process group on a machine without an accelerator only when it is told to use the CPU;
otherwise each of the processes that `torchrun` or `accelerate launch --multi_gpu` started would run as an
independent one-process job, all writing the same run directory. And `accelerate launch --cpu
--num_processes N` starts a single process unless it is given an MPI hostfile (huggingface/accelerate#2741), so
a run asked for N processes would silently train with 1/N of the intended global batch. Both are caught here.
"""

from __future__ import annotations

import os

import torch

from dskd.errors import DskdError

WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


class LaunchError(DskdError):
    """The processes were started in a way that cannot give the run that was asked for."""


def launched_world_size(env: dict[str, str] | None = None) -> int:
    """How many processes the launcher says it started (1 when none did)."""
    env = os.environ if env is None else env
    for name in WORLD_SIZE_VARIABLES:
        if env.get(name, "").strip().isdigit():
            return int(env[name])
    return 1


def has_accelerator() -> bool:
    """Whether accelerate would find a device backend (CUDA, XPU, ...) to put each process on."""
    if torch.cuda.is_available():
        return True
    from accelerate.utils import is_mlu_available, is_musa_available, is_npu_available, is_xpu_available

    return is_xpu_available() or is_npu_available() or is_mlu_available() or is_musa_available()


def check_cpu_launch(env: dict[str, str] | None = None) -> None:
    """Refuse `accelerate launch --cpu --num_processes N` (N > 1), which starts one process, not N."""
    env = os.environ if env is None else env
    asked_for_cpu = env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    # accelerate's single-process launcher sets MASTER_ADDR only when more processes were asked for.
    if asked_for_cpu and "MASTER_ADDR" in env and launched_world_size(env) == 1:
        raise LaunchError(
            "accelerate launch --cpu started one process although more were asked for (accelerate runs several CPU "
            "processes only through mpirun); for data parallelism on CPU use `accelerate launch --multi_gpu "
            "--num_processes N -m dskd run FILE` or `torchrun --nproc_per_node N -m dskd run FILE`, or drop --num_processes"
        )


def requested_cpu_processes(env: dict[str, str] | None = None, parent_argv: list[str] | None = None) -> int:
    """N of `accelerate launch --cpu --num_processes N` when accelerate started this one process instead of N.

    1 when this process was not started that way (or N is 1); 0 when it was but N cannot be read. accelerate
    passes N to no child, so it is read back from the launcher's own command line (this process's parent) and,
    failing that, from the accelerate config file the launcher used.
    """
    env = os.environ if env is None else env
    asked_for_cpu = env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if not (asked_for_cpu and "MASTER_ADDR" in env and launched_world_size(env) == 1):
        return 1
    argv = _parent_argv() if parent_argv is None else parent_argv
    marks = [
        i
        for i, a in enumerate(argv)
        if a in ("launch", "accelerate.commands.launch") or a.endswith("accelerate-launch")
    ]
    if not marks:
        return 0
    try:
        from accelerate.commands.launch import launch_command_parser

        args, _ = launch_command_parser().parse_known_args(argv[marks[0] + 1 :])
        count = args.num_processes
        if count is None:
            from accelerate.commands.config.config_args import load_config_from_file

            count = load_config_from_file(args.config_file).num_processes
        return int(count or 0)
    except (SystemExit, Exception):  # an unreadable command line or config: N is unknown
        return 0


def _parent_argv() -> list[str]:
    try:
        raw = open(f"/proc/{os.getppid()}/cmdline", "rb").read()
    except OSError:  # not Linux, or no access: N is unknown
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def spawn_processes(count: int, argv: list[str]) -> int:
    """Run `python -m dskd *argv` as `count` data-parallel processes on this machine (gloo, ranks 0..count-1)
    and wait for them: what `accelerate launch --cpu --num_processes N` was asked for. The first process to fail
    stops the others; its exit status is returned. SIGINT/SIGTERM are passed on."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    children = []
    for rank in range(count):
        env = {
            **base,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(count),
            "LOCAL_WORLD_SIZE": str(count),
            "GROUP_RANK": "0",
        }
        children.append(subprocess.Popen([sys.executable, "-m", "dskd", *argv], env=env))

    def forward(signum, _frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            codes = [child.poll() for child in children]
            failed = [code for code in codes if code not in (None, 0)]
            if failed:
                for child in children:
                    if child.poll() is None:
                        child.terminate()
                for child in children:
                    child.wait()
                return failed[0]
            if all(code == 0 for code in codes):
                return 0
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def make_accelerator(mixed_precision: str = "no"):
    """The `Accelerator` of this process, in the process group of its launcher when there is one."""
    from accelerate import Accelerator

    check_cpu_launch()
    cpu = launched_world_size() > 1 and not has_accelerator()
    try:
        accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    except ValueError:
        # accelerate keeps one state per process; a second job in the same process (a notebook, the reproduction
        # benchmark, tests) with another precision resets it, which is safe with a single process.
        if launched_world_size() > 1:
            raise
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    if accelerator.num_processes != launched_world_size():
        raise LaunchError(
            f"the launcher started {launched_world_size()} processes but accelerate joined {accelerator.num_processes}; "
            f"check the launcher's settings (accelerate config) or run one process with `dskd run FILE`"
        )
    return accelerator


def average_gradients(accelerator, params: list) -> None:
    """Average the gradients of parameters that live outside the prepared (DDP-wrapped) model over processes,
    as DDP does for the student's (the objective's projectors): nothing else would synchronise them, and each
    process would train its own copy.

    One collective for all of them: the gradients flattened, plus one presence flag per parameter, so a parameter
    no process gave a gradient keeps `None` (skipped by the optimizer, as in one process) while one that only
    some processes reached gets their mean.
    """
    if accelerator.num_processes == 1 or not params:
        return
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
        + [torch.tensor([float(p.grad is not None) for p in params], device=accelerator.device)]
    )
    flat = accelerator.reduce(flat, reduction="sum")
    present = flat[-len(params) :].tolist()
    offset = 0
    for param, seen in zip(params, present):
        n = param.numel()
        if seen:
            param.grad = (flat[offset : offset + n] / accelerator.num_processes).view_as(param).to(param.dtype)
        offset += n
