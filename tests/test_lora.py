"""LoRA students (`[student] lora`, peft): what trains, what `final/` holds and how it loads, DSKDv2's closed-form
map under a frozen head, gradient checkpointing, and the refusals (one line, at setup)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from tiny_job import TOKENIZERS, llama_config, write_job

from dskd.config import load_config
from dskd.errors import ConfigError, ModelError
from dskd.models.lora import LoraSettings, apply_lora
from dskd.registry import load_registry
from dskd.run.components import build_objective, build_student, build_teacher
from dskd.run.engine import Trainer
from dskd.run.job import Job

REGISTRY = load_registry()
ADAPTED = ["q_proj", "v_proj"]


def _base(folder: Path, seed: int = 5) -> Path:
    """A saved random-init 1-layer Llama with its tokenizer: LoRA needs weights on disk."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    if not (folder / "config.json").exists():
        torch.manual_seed(seed)
        config = LlamaConfig(**{k: v for k, v in llama_config(16).items() if k != "architectures"})
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        AutoTokenizer.from_pretrained(TOKENIZERS / "tinyllama").save_pretrained(folder)
    return folder


def _lora_job(tmp: Path, *, targets=ADAPTED, objective: str = "dskd_v2", extra: str = "", steps: int = 3) -> Path:
    path = write_job(tmp, objective=objective, steps=steps, samples=16)
    base = _base(tmp / "base")
    table = f"lora = {{ r = 4, alpha = 8, dropout = 0.0, target_modules = {list(targets)!r} }}".replace("'", '"')
    text = path.read_text().replace('[student]\nconfig = "student"', f'[student]\nmodel = "{base}"\n{table}\n{extra}')
    path.write_text(text)
    return path


def _job(path: Path, overrides=()) -> Job:
    job = Job(load_config(path, list(overrides), registry=REGISTRY), REGISTRY)
    job.prepare_run_dir()
    return job


def _trained_parameters(monkeypatch, job: Job) -> tuple[set[str], set[str], Trainer]:
    """(student parameters that had a gradient at the first optimizer step, projector ones, the trainer)."""
    seen: dict[str, set[str]] = {}
    original = Trainer.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen["trainer"] = self
        step = self.optimizer.step

        def record(*a, **k):
            if "student" not in seen:
                seen["student"] = {n for n, p in self.model.named_parameters() if p.grad is not None}
                seen["projectors"] = {n for n, p in self.projectors.named_parameters() if p.grad is not None}
            return step(*a, **k)

        self.optimizer.step = record

    monkeypatch.setattr(Trainer, "__init__", init)
    job.distill(None)
    return seen["student"], seen["projectors"], seen["trainer"]


@pytest.mark.integration
def test_lora_trains_only_the_adapters_and_the_projectors(tmp_path, monkeypatch):
    student, projectors, trainer = _trained_parameters(monkeypatch, _job(_lora_job(tmp_path)))
    assert student and all(".lora_A." in n or ".lora_B." in n for n in student), sorted(student)
    adapters = {n for n, _ in trainer.model.named_parameters() if ".lora_" in n}
    assert student == adapters  # every adapter of q_proj and v_proj, and nothing else of the student
    assert projectors == {n for n, _ in trainer.projectors.named_parameters()}
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    frozen = [n for n, p in trainer.model.named_parameters() if id(p) in optimised and ".lora_" not in n]
    assert not frozen  # the optimizer holds no frozen weight (no Adam state for them)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert 0 < trainable < 0.01 * sum(p.numel() for p in trainer.model.parameters())


@pytest.mark.integration
def test_a_head_named_in_target_modules_trains_whole_and_the_objectives_read_its_trained_copy(tmp_path, monkeypatch):
    student, _, trainer = _trained_parameters(monkeypatch, _job(_lora_job(tmp_path, targets=[*ADAPTED, "lm_head"])))
    head = {n for n in student if "lm_head" in n}
    assert head and all("modules_to_save" in n for n in head)  # the whole head (peft's trainable copy), no adapter
    view = trainer.spec.objective.student_head
    trained_copy = dict(trainer.model.named_parameters())[next(iter(head))]
    assert view.weight.data_ptr() == trained_copy.data_ptr() and view.trainable


@pytest.mark.integration
def test_a_frozen_head_computes_dskd_v2_s_closed_form_map_once(tmp_path, monkeypatch):
    _, _, trainer = _trained_parameters(monkeypatch, _job(_lora_job(tmp_path)))
    objective = trainer.spec.objective
    first = objective.s2t_weight
    objective.on_optimizer_step()
    assert objective.s2t_weight is first  # not recomputed: the student head cannot change

    _, _, trained = _trained_parameters(monkeypatch, _job(_lora_job(tmp_path / "head", targets=[*ADAPTED, "lm_head"])))
    before = trained.spec.objective.s2t_weight
    trained.spec.objective.on_optimizer_step()
    assert trained.spec.objective.s2t_weight is not before  # a trained head: refreshed every step


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.integration
@pytest.mark.parametrize("merge", [False, True])
def test_final_holds_the_adapter_or_the_merged_model_and_each_loads_with_its_library(tmp_path, monkeypatch, merge):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    extra = "merge_lora = true" if merge else ""
    _, _, trainer = _trained_parameters(monkeypatch, _job(_lora_job(tmp_path, extra=extra)))
    trained = trainer.model.eval()
    final = tmp_path / "run" / "final"
    ids = torch.arange(3, 40).reshape(1, -1)
    want = _logits(trained, ids)
    adapter_dir = final / "adapter" if merge else final
    assert (adapter_dir / "adapter_config.json").exists()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), adapter_dir)
    assert torch.allclose(_logits(adapted.eval(), ids), want, atol=1e-5)
    if merge:
        plain = AutoModelForCausalLM.from_pretrained(final)
        assert not any("lora" in n for n, _ in plain.named_parameters())  # an ordinary model
        assert torch.allclose(_logits(plain.eval(), ids), want, atol=1e-5)
    else:
        assert not (final / "config.json").exists() and not (final / "model.safetensors").exists()
        # transformers' own peft integration loads the base named in the adapter's config, then the adapter.
        assert torch.allclose(_logits(AutoModelForCausalLM.from_pretrained(final).eval(), ids), want, atol=1e-5)
    # The base weights never changed: the adapter is the whole training.
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    merged_away = trained.get_base_model().state_dict()
    for name, value in base.items():
        if "q_proj" not in name and "v_proj" not in name:
            assert torch.equal(merged_away[name], value), name


@pytest.mark.integration
def test_a_lora_checkpoint_holds_the_adapters_alone_and_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    overrides = ["train.max_steps=6", "train.save_every=2"]
    straight = _job(_lora_job(tmp_path / "straight"), overrides)
    straight.distill(None)

    path = _lora_job(tmp_path / "crashed")
    original = Trainer.train_step

    def crash_at_step_5(self, window, meter):
        if self.state.step == 4:
            raise KeyboardInterrupt
        return original(self, window, meter)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        _job(path, overrides).distill(None)
    monkeypatch.setattr(Trainer, "train_step", original)
    saved = torch.load(tmp_path / "crashed" / "run" / "checkpoints" / "distill" / "step-00000004" / "model.pt")
    assert saved and all(".lora_" in name for name in saved)  # the frozen base is not written again
    resumed = Job(load_config(path, overrides, registry=REGISTRY), REGISTRY, resume=True)
    resumed.prepare_run_dir()
    resumed.distill(None)
    from safetensors.torch import load_file

    want = load_file(tmp_path / "straight" / "run" / "final" / "adapter_model.safetensors")
    got = load_file(tmp_path / "crashed" / "run" / "final" / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_gradient_checkpointing_gives_a_lora_student_identical_gradients(tmp_path):
    path = _lora_job(tmp_path)
    grads = []
    for checkpointing in (False, True):
        config = load_config(path, [f"student.gradient_checkpointing={str(checkpointing).lower()}"], registry=REGISTRY)
        torch.manual_seed(0)  # the adapters' random init (as the job's seed does)
        student = build_student(config, torch.device("cpu"))
        teacher = build_teacher(config, torch.device("cpu"))
        objective, _ = build_objective(config, REGISTRY, student, teacher, None)
        model = student.model.train()
        ids = torch.arange(5, 69).reshape(2, 32)
        from dskd.kit.lm_head import last_hidden_state

        hidden = last_hidden_state(model, ids)
        head = objective.student_head
        loss = torch.logsumexp(head.logits(hidden), -1).mean() - head.logits(hidden)[..., 7].mean()
        loss.backward()
        named = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert named and all(".lora_" in n for n in named)
        grads.append(named)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_target_modules_that_match_nothing_are_refused_naming_the_model_s_linear_layers(tmp_path):
    config = load_config(_lora_job(tmp_path, targets=["query", "value"]), registry=REGISTRY)
    with pytest.raises(ModelError) as info:
        build_student(config, torch.device("cpu"))
    line = str(info.value)
    assert "\n" not in line and "match no module" in line and "q_proj" in line


def test_lora_on_modules_peft_cannot_adapt_is_refused_in_one_line(tmp_path):
    config = load_config(_lora_job(tmp_path, targets=["input_layernorm"]), registry=REGISTRY)
    with pytest.raises(ModelError) as info:
        build_student(config, torch.device("cpu"))
    assert "\n" not in str(info.value) and "peft cannot add LoRA adapters" in str(info.value)


def test_a_model_type_without_peft_defaults_needs_its_target_modules_named():
    class Plain(torch.nn.Module):
        config = type("Config", (), {"model_type": "no_such_architecture"})()

    with pytest.raises(ModelError, match="no default LoRA target modules for model type 'no_such_architecture'"):
        apply_lora(Plain(), LoraSettings())


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["student.merge_lora=true"], "student.merge_lora"),
        (["student.lora={ r = 0 }"], "student.lora.r"),
        (["student.lora={ rank = 4 }"], "student.lora.rank"),
        (["student.lora={ dropout = 1.5 }"], "student.lora.dropout"),
    ],
)
def test_bad_lora_settings_are_config_errors_naming_the_key(tmp_path, overrides, key):
    path = write_job(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, registry=REGISTRY)
    assert key in str(info.value)


def test_lora_on_a_random_init_student_is_refused_naming_student_model(tmp_path):
    path = write_job(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(path, ['student.lora={ r = 4, target_modules = ["q_proj"] }'], registry=REGISTRY)
    assert "student.lora" in str(info.value) and "student.model" in str(info.value)


def test_settings_are_typed():
    from dskd.models.lora import lora_settings

    settings = lora_settings({"r": 8, "alpha": 16, "dropout": 0, "target_modules": "q_proj"})
    assert settings == dataclasses.replace(LoraSettings(), r=8, alpha=16.0, dropout=0.0, target_modules=("q_proj",))
