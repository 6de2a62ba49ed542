"""The out-of-tree plugin `examples/dskd-example-plugin/`: its divergence against the closed form, and the
package seen by dskd as an installed distribution, without touching the environment.

"Installed" here means: `PYTHONPATH` holds the example's `src/` plus a temporary folder with a generated
`dskd_example_plugin-0.1.0.dist-info/` whose `entry_points.txt` is copied from the example's pyproject, which
is all `importlib.metadata` (and so dskd's loader) looks at.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch

from dskd.kit.chunked import chunked_loss, dense_loss
from dskd.registry import LOAD_ENV, load_registry, option_defaults

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "dskd-example-plugin"
TOKENIZER = REPO / "examples" / "tokenizers" / "tinyllama"


@pytest.fixture(scope="module")
def example_module():
    sys.path.insert(0, str(EXAMPLE / "src"))
    try:
        import dskd_example_plugin

        yield dskd_example_plugin
    finally:
        sys.path.remove(str(EXAMPLE / "src"))
        sys.modules.pop("dskd_example_plugin", None)


@pytest.fixture
def hellinger(example_module):
    return example_module.hellinger


# ---------------------------------------------------------------------------------------------------------
# The divergence (example code users copy) against the closed form
# ---------------------------------------------------------------------------------------------------------


def closed_form(student_logits: np.ndarray, teacher_logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """H^2 = 1 - sum_v sqrt(p_t,v p_s,v), in float64, one row at a time."""
    out = []
    for zs, zt in zip(student_logits, teacher_logits):
        ps = np.exp(zs / temperature - np.logaddexp.reduce(zs / temperature))
        pt = np.exp(zt / temperature - np.logaddexp.reduce(zt / temperature))
        out.append(1.0 - sum(math.sqrt(a * b) for a, b in zip(ps, pt)))
    return np.array(out)


def closed_form_student_gradient(zs: np.ndarray, zt: np.ndarray, temperature: float) -> np.ndarray:
    """d H^2 / d z_s,j = -(1 / 2 tau) (sqrt(p_t,j p_s,j) - p_s,j * BC), BC = sum_v sqrt(p_t,v p_s,v)."""
    ps = np.exp(zs / temperature - np.logaddexp.reduce(zs / temperature))
    pt = np.exp(zt / temperature - np.logaddexp.reduce(zt / temperature))
    overlap = np.sqrt(ps * pt)
    return -(overlap - ps * overlap.sum()) / (2.0 * temperature)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_hellinger_equals_the_closed_form(hellinger, temperature):
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(6, 11, generator=generator, dtype=torch.float64) * 3
    teacher = torch.randn(6, 11, generator=generator, dtype=torch.float64) * 3
    got = hellinger(student, teacher, temperature=temperature)
    assert got.shape == (6,) and got.dtype == torch.float32
    expected = closed_form(student.numpy(), teacher.numpy(), temperature)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_hellinger_of_a_hand_worked_pair(hellinger):
    # p_s = (1, 0) (a -inf logit), p_t = (1/2, 1/2): H^2 = 1 - sqrt(1/2).
    student = torch.tensor([[0.0, float("-inf")]])
    teacher = torch.tensor([[0.0, 0.0]])
    assert hellinger(student, teacher).item() == pytest.approx(1 - math.sqrt(0.5), abs=1e-6)
    # Disjoint supports: the maximum, 1.
    disjoint = hellinger(torch.tensor([[0.0, float("-inf")]]), torch.tensor([[float("-inf"), 0.0]]))
    assert disjoint.item() == pytest.approx(1.0)


def test_hellinger_is_zero_for_equal_and_symmetric_otherwise(hellinger):
    logits = torch.randn(4, 9, generator=torch.Generator().manual_seed(2))
    other = torch.randn(4, 9, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(hellinger(logits, logits), torch.zeros(4), atol=1e-6)
    assert torch.allclose(hellinger(logits + 5.0, logits), torch.zeros(4), atol=1e-6)  # softmax is shift-invariant
    torch.testing.assert_close(hellinger(logits, other), hellinger(other, logits))
    assert bool(((hellinger(logits, other) > 0) & (hellinger(logits, other) <= 1)).all())


def test_hellinger_gradient_equals_the_closed_form(hellinger):
    generator = torch.Generator().manual_seed(4)
    student = torch.randn(3, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 7, generator=generator, dtype=torch.float64)
    # The example computes in float32 (`.float()`), so the gradient is compared at float32 precision.
    hellinger(student, teacher, temperature=1.5).sum().backward()
    for row in range(3):
        expected = closed_form_student_gradient(student[row].detach().numpy(), teacher[row].numpy(), 1.5)
        np.testing.assert_allclose(student.grad[row].numpy(), expected, rtol=1e-4, atol=1e-6)


def test_hellinger_returns_float32_for_bfloat16_input(hellinger):
    logits = torch.randn(2, 5).to(torch.bfloat16)
    assert hellinger(logits, logits.flip(-1)).dtype == torch.float32


def test_hellinger_gives_the_same_loss_and_gradients_chunked_and_dense(hellinger):
    # A divergence must work inside chunked_loss unchanged (docs/plugins.md, "Gradient parity").
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(10, 8, generator=generator, requires_grad=True)
    head = torch.randn(8, 50, generator=generator, requires_grad=True)
    teacher = torch.randn(10, 50, generator=generator)

    def loss(rows, shared):
        return hellinger(rows["hidden"] @ shared["head"], rows["teacher"], temperature=2.0).sum(), {}

    dense, _ = dense_loss(loss, {"hidden": hidden, "teacher": teacher}, {"head": head})
    expected = torch.autograd.grad(dense, (hidden, head))
    chunked, _ = chunked_loss(loss, {"hidden": hidden, "teacher": teacher}, {"head": head}, chunk_size=3)
    got = torch.autograd.grad(chunked, (hidden, head))
    torch.testing.assert_close(chunked, dense)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_hellinger_registers_in_process_and_takes_no_options(example_module):
    registry = load_registry(extra_plugins=[example_module], entry_points=False)
    assert registry.get("divergences", "hellinger") is example_module.hellinger
    assert registry.registrations[("divergences", "hellinger")].plugin == "dskd_example_plugin"
    assert option_defaults(example_module.hellinger, skip=("temperature",)) == {}


# ---------------------------------------------------------------------------------------------------------
# The package as an installed distribution, through the real loader in subprocesses
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def installed_env(tmp_path_factory) -> dict[str, str]:
    """An environment in which `python -m dskd` sees dskd-example-plugin as installed."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    site = tmp_path_factory.mktemp("site")
    info = site / f"dskd_example_plugin-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    entry_points = "".join(f"{name} = {value}\n" for name, value in project["entry-points"]["dskd"].items())
    (info / "entry_points.txt").write_text(f"[dskd]\n{entry_points}")
    env = {key: value for key, value in os.environ.items() if key != LOAD_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(EXAMPLE / "src"), str(site), env.get("PYTHONPATH")]))
    return env


def run_dskd(*args: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dskd", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


def test_example_pyproject_declares_the_entry_point():
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    assert project["name"] == "dskd-example-plugin"
    assert project["entry-points"]["dskd"] == {"hellinger": "dskd_example_plugin"}


@pytest.mark.integration
def test_installed_example_is_listed_by_dskd_plugins(installed_env):
    result = run_dskd("plugins", "--json", env=installed_env)
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert "hellinger" in listing["divergences"] and "forward_kl" in listing["divergences"]
    plugin = next(p for p in listing["plugins"] if p["name"] == "hellinger")
    assert plugin == {
        "name": "hellinger",
        "package": "dskd-example-plugin",
        "version": "0.1.0",
        "registered": {"divergences": ["hellinger"]},
    }


@pytest.mark.integration
def test_validate_accepts_hellinger_only_while_the_plugin_loads(installed_env):
    args = ("validate", str(REPO / "dskd.toml"), "--set", "divergence.name=hellinger")
    accepted = run_dskd(*args, env=installed_env)
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout.strip().endswith(": ok")

    rejected = run_dskd(*args, env={**installed_env, LOAD_ENV: ""})
    assert rejected.returncode == 2
    assert "divergence.name: unknown divergence 'hellinger'; known: " in rejected.stderr
    assert "Traceback" not in rejected.stderr


@pytest.mark.integration
def test_tiny_distillation_with_the_example_divergence(installed_env, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    model = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (tmp_path / "student.json").write_text(json.dumps(model))
    (tmp_path / "teacher.json").write_text(json.dumps({**model, "hidden_size": 48, "intermediate_size": 96}))
    lines = (REPO / "examples" / "data" / "tasks" / "train.jsonl").read_text().splitlines()[:64]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "job.toml").write_text(f"""
[run]
output_dir = "run"
stages = ["distill"]
log_every = 1

[student]
config = "student.json"
tokenizer = "{TOKENIZER.as_posix()}"

[teacher]
config = "teacher.json"
tokenizer = "{TOKENIZER.as_posix()}"

[data]
train = "train.jsonl"
max_length = 128
max_prompt_length = 96

[train]
max_steps = 2
batch_size = 4

[objective]
name = "kd"

[divergence]
name = "hellinger"
""")
    result = run_dskd("run", "job.toml", env=installed_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    distill = [m for m in metrics if m.get("stage") == "distill"]
    assert [m["step"] for m in distill] == [1, 2]
    assert all(math.isfinite(m["train/loss"]) for m in distill)
    assert "divergence hellinger" in result.stdout
    student = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert student.config.hidden_size == 32 and student.config.vocab_size == 32000
