"""Sharding at setup: which launches shard and which are refused (one line, exit 2, nothing written), the head view
that follows replaced parameters, the gradient clipping over sharded and whole gradients, and the plain model
that `final/` is written from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from tiny_job import llama_config, write_job

from dskd.config import TrainConfig
from dskd.kit.lm_head import HeadView, head_from_model, head_view
from dskd.run.launch import LaunchError
from dskd.run.sharding import FSDP, clip_grad_norm, decoder_blocks, plain_model, sharding_mode


def _accelerator(kind: DistributedType, processes: int, fsdp_version: int | None = None):
    plugin = None if fsdp_version is None else SimpleNamespace(fsdp_version=fsdp_version)
    return SimpleNamespace(distributed_type=kind, num_processes=processes, state=SimpleNamespace(fsdp_plugin=plugin))


def test_train_sharding_fsdp_shards_over_several_processes_and_none_does_not():
    assert sharding_mode(TrainConfig(sharding="fsdp"), _accelerator(DistributedType.MULTI_CPU, 2), {}) == FSDP
    assert sharding_mode(TrainConfig(), _accelerator(DistributedType.MULTI_CPU, 2), {}) == "none"


def test_accelerate_s_fsdp_plugin_version_2_selects_fsdp_and_version_1_is_refused_naming_version_2():
    assert sharding_mode(TrainConfig(), _accelerator(DistributedType.FSDP, 2, fsdp_version=2), {}) == FSDP
    with pytest.raises(LaunchError, match="fsdp_version: 2") as info:
        sharding_mode(TrainConfig(), _accelerator(DistributedType.FSDP, 2, fsdp_version=1), {})
    assert "\n" not in str(info.value)


def test_accelerate_s_fsdp_launch_on_cpus_is_read_from_the_environment_it_sets():
    # On CPUs accelerate's Accelerator reports a plain multi-process run for an FSDP launch; its launcher's
    # environment still says what was asked for.
    cpu = _accelerator(DistributedType.MULTI_CPU, 2)
    assert sharding_mode(TrainConfig(), cpu, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}) == FSDP
    with pytest.raises(LaunchError, match="FSDP version 1"):
        sharding_mode(TrainConfig(), cpu, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})
    with pytest.raises(LaunchError, match="DeepSpeed is not supported"):
        sharding_mode(TrainConfig(), cpu, {"ACCELERATE_USE_DEEPSPEED": "true"})


def test_fsdp_in_one_process_is_refused_naming_the_launch():
    with pytest.raises(LaunchError, match="2 or more processes") as info:
        sharding_mode(TrainConfig(sharding="fsdp"), _accelerator(DistributedType.NO, 1), {})
    assert "torchrun" in str(info.value) and "\n" not in str(info.value)


def test_deepspeed_is_refused_naming_fsdp():
    with pytest.raises(LaunchError) as info:
        sharding_mode(TrainConfig(), _accelerator(DistributedType.DEEPSPEED, 2), {})
    assert "DeepSpeed is not supported" in str(info.value) and 'sharding = "fsdp"' in str(info.value)


def _llama(layers: int = 2):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(**{k: v for k, v in llama_config(16, layers=layers, vocab=64).items() if k != "architectures"})
    return AutoModelForCausalLM.from_config(config)


def test_the_decoder_blocks_are_the_model_s_repeated_layers():
    model = _llama(layers=3)
    assert decoder_blocks(model) == list(model.model.layers)
    with pytest.raises(Exception, match="declares no decoder block"):
        decoder_blocks(torch.nn.Linear(2, 2))


def test_the_head_view_reads_the_head_module_at_each_use():
    model = _llama()
    view = head_view(model, 60, name="student")
    fixed = head_from_model(model, 60, name="student")
    assert isinstance(view, HeadView) and (view.vocab_size, view.hidden_size) == (60, 16)
    hidden = torch.randn(3, 16)
    assert torch.equal(view.logits(hidden), fixed.logits(hidden))
    # What FSDP2 does between steps: the module's parameter object is replaced. A view taken at setup follows;
    # the plain head keeps pointing at the old tensor.
    replacement = torch.nn.Parameter(torch.randn(64, 16))
    model.get_output_embeddings().weight = replacement
    assert torch.equal(view.weight, replacement[:60]) and not torch.equal(fixed.weight, replacement[:60])
    replacement.requires_grad_(False)
    assert not view.trainable and fixed.trainable


def test_clipping_over_whole_gradients_equals_torch_s():
    torch.manual_seed(1)
    ours = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, theirs):
        a.grad = torch.randn_like(a) * 3
        b.grad = a.grad.clone()
    norm = clip_grad_norm(ours, 1.0)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert torch.allclose(norm, expected)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a.grad, b.grad)


def test_the_plain_model_for_final_holds_the_gathered_state_with_tied_weights():
    model = _llama()
    plain = plain_model(model, {k: v.clone() for k, v in model.state_dict().items()})
    assert plain.get_output_embeddings().weight is plain.get_input_embeddings().weight
    for name, value in model.state_dict().items():
        assert torch.equal(plain.state_dict()[name], value), name


def _run(path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dskd", "run", str(path), *(a for o in overrides for a in ("--set", o))]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=path.parent)


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("dskd: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


@pytest.mark.integration
@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.sharding=fsdp"], "needs 2 or more processes"),
        (["train.sharding=deepspeed"], "DeepSpeed is not supported"),
        (["student.merge_lora=true"], "student.merge_lora"),
    ],
)
def test_bad_sharding_and_lora_input_is_one_line_before_anything_is_written(tmp_path, overrides, expected):
    path = write_job(tmp_path)
    line = _one_line_error(_run(path, *overrides))
    assert expected in line
    assert not (tmp_path / "run").exists()
