"""How a process joins its launcher's process group, and the launches that cannot give the run asked for."""

from __future__ import annotations

import pytest

from dskd.run.launch import (
    LaunchError,
    check_cpu_launch,
    launched_world_size,
    make_accelerator,
    requested_cpu_processes,
)


def test_world_size_is_read_from_torchrun_or_mpi_variables():
    assert launched_world_size({}) == 1
    assert launched_world_size({"WORLD_SIZE": "4"}) == 4
    assert launched_world_size({"OMPI_COMM_WORLD_SIZE": "3"}) == 3
    assert launched_world_size({"PMI_SIZE": "2", "WORLD_SIZE": "2"}) == 2


def test_accelerate_cpu_launch_that_started_one_of_several_processes_is_refused():
    # What `accelerate launch --cpu --num_processes 2` gives its single child (accelerate's simple launcher).
    env = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    with pytest.raises(LaunchError, match="--multi_gpu --num_processes N") as info:
        check_cpu_launch(env)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "env",
    [
        {"ACCELERATE_USE_CPU": "True"},  # accelerate launch --cpu, one process asked for
        {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2"},  # torchrun-style, really 2
        {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "PMI_SIZE": "2"},  # accelerate's mpirun path
        {"MASTER_ADDR": "10.0.0.1"},  # a cluster environment, not accelerate's CPU launcher
    ],
)
def test_launches_that_start_what_was_asked_for_pass(env):
    check_cpu_launch(env)


def test_a_plain_process_gets_a_one_process_accelerator(monkeypatch):
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    accelerator = make_accelerator("no")
    assert accelerator.num_processes == 1 and accelerator.is_main_process


def test_a_model_whose_weights_accelerate_moved_is_refused_naming_fsdp2_and_ddp(tmp_path):
    # dskd shards with FSDP2 itself (`dskd.run.sharding`); a data-parallel `prepare` that copied the weights (a
    # device placement dskd did not ask for) would leave the head view on a stale module: prepare hands back a copy.
    import copy
    from types import SimpleNamespace

    import torch
    from accelerate.utils import DistributedType

    from dskd.config import TrainConfig
    from dskd.console import Console
    from dskd.run.engine import StageSpec, Trainer
    from dskd.types import SignalRequest

    class ShardingAccelerator:
        device, num_processes, distributed_type = torch.device("cpu"), 2, DistributedType.MULTI_GPU

        def prepare(self, model, optimizer, device_placement=None):
            return copy.deepcopy(model), optimizer

        def unwrap_model(self, model):
            return model

    objective = SimpleNamespace(trainable_modules=lambda: None, request=SignalRequest())
    spec = StageSpec(
        "distill", torch.nn.Linear(4, 3), objective, None, None, lambda consumed: iter(()), TrainConfig(), tmp_path, 1
    )
    with pytest.raises(LaunchError, match="FSDP2") as info:
        Trainer.for_stage(spec, ShardingAccelerator(), Console(enabled=False))
    assert "\n" not in str(info.value) and "DDP" in str(info.value) and 'train.sharding = "fsdp"' in str(info.value)


CPU_CHILD = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize(
    "parent, expected",
    [
        (
            [
                "/venv/bin/python",
                "/venv/bin/accelerate",
                "launch",
                "--num_processes",
                "2",
                "--cpu",
                "-m",
                "dskd",
                "run",
                "x.toml",
            ],
            2,
        ),
        (
            ["python", "-m", "accelerate.commands.launch", "--cpu", "--num_processes=3", "-m", "dskd", "run", "x.toml"],
            3,
        ),
        (["python", "some_other_launcher.py"], 0),  # N cannot be read: the launch is refused later, in one line
    ],
)
def test_the_process_count_of_a_cpu_launch_is_read_back_from_the_launcher(parent, expected):
    assert requested_cpu_processes(CPU_CHILD, parent_argv=parent) == expected


def test_processes_not_started_by_the_cpu_launcher_need_no_respawn():
    assert requested_cpu_processes({}, parent_argv=["accelerate", "launch", "--num_processes", "2"]) == 1
    assert requested_cpu_processes({**CPU_CHILD, "WORLD_SIZE": "2"}, parent_argv=[]) == 1
