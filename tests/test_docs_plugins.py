"""docs/plugins.md cannot rot: every ```python example in it runs, and the plugins it shows work in dskd.

Each example block starts with a marker line `# docs-example: <name>`. The divergence, aligner, policy and
objective examples become modules (`dskd_my_kl`, `dskd_end_match`, `dskd_kd_dropout`, `dskd_agree_kd`, as the
doc names them) that later blocks import. The aligner written from the doc alone is registered like a
third-party plugin and drives `dskd_v2` across two real tokenizers (TinyLlama teacher, GPT-2 student).
"""

from __future__ import annotations

import pickle
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

# isort: off
# dskd.kit first: importing dskd.data.examples (through cross_vocab_models) before it is a circular import.
import dskd.kit
from cross_vocab_models import make_batch, make_context, models, run_objective, tokenizer
from tiny_job import write_job
# isort: on

from dskd.kit import Aligner, Policy, member, objective_loss
from dskd.kit.lm_head import last_hidden_state
from dskd.plugins.divergences.forward_kl import forward_kl
from dskd.registry import load_registry

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
MARKER = re.compile(r"^# docs-example: ([a-z-]+)$")
MODULES = {
    "divergence": "dskd_my_kl",
    "aligner": "dskd_end_match",
    "policy": "dskd_kd_dropout",
    "objective": "dskd_agree_kd",
}


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", DOC.read_text(), flags=re.M | re.S)


def examples() -> dict[str, str]:
    found = {}
    for block in python_blocks():
        match = MARKER.match(block.splitlines()[0])
        assert match, f"a python block of docs/plugins.md lacks its '# docs-example: <name>' line:\n{block[:200]}"
        assert match.group(1) not in found, f"two examples are named {match.group(1)!r}"
        found[match.group(1)] = block
    return found


def module_of(name: str) -> types.ModuleType:
    """The example block `name` as the module the doc says it is."""
    module = types.ModuleType(MODULES[name])
    exec(compile(examples()[name], f"docs/plugins.md[{name}]", "exec"), module.__dict__)
    return module


@pytest.fixture
def plugin_modules(monkeypatch) -> dict[str, types.ModuleType]:
    """The four plugin examples, importable by their documented module names (and so picklable)."""
    built = {name: module_of(name) for name in MODULES}
    for module in built.values():
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return built


def gpt2_bytes(tok, ids) -> bytes:
    """The text (spaces removed) of byte-level BPE pieces, from GPT-2's byte-to-unicode table."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    shifted = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(shifted)}
    return bytes(table[c] for piece in tok.convert_ids_to_tokens(ids) for c in piece).replace(b" ", b"")


def llama_bytes(tok, ids) -> bytes:
    """The text (spaces removed) of SentencePiece pieces: `<0xNN>` is a byte, `▁` a space."""
    pieces = tok.convert_ids_to_tokens(ids)
    return (
        b"".join(bytes([int(p[3:5], 16)]) if re.fullmatch(r"<0x[0-9A-F]{2}>", p) else p.encode() for p in pieces)
        .replace("▁".encode(), b"")
        .replace(b" ", b"")
    )


def test_every_python_block_is_a_marked_example_and_the_four_contracts_have_one():
    assert set(MODULES) <= set(examples())
    assert len(examples()) == len(python_blocks())


def test_the_doc_names_every_kit_export_and_no_retired_contract():
    text = DOC.read_text()
    missing = [name for name in dskd.kit.__all__ if f"`{name}" not in text]
    assert not missing, f"docs/plugins.md does not describe dskd.kit names {missing}"
    for retired in ("compute_ce", "denominator) ->", "-> Batch`", "dskd.kit.policy.PolicyContext", "dskd.kit.chunked."):
        assert retired not in text, retired


def test_every_example_runs_and_the_test_examples_pass(plugin_modules, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_job(tmp_path, objective="kd")  # job.toml, for the batch-loss example
    for name, block in examples().items():
        if name in MODULES:
            continue  # already executed as modules
        namespace = {"__name__": f"docs_example_{name.replace('-', '_')}"}
        exec(compile(block, f"docs/plugins.md[{name}]", "exec"), namespace)
        for test in [value for key, value in namespace.items() if key.startswith("test_") and callable(value)]:
            test()


def test_the_documented_aligner_registers_as_a_plugin_and_drives_dskd_v2_across_tokenizers(plugin_modules):
    registry = load_registry(extra_plugins=[plugin_modules["aligner"]])
    assert registry.registrations[("aligners", "end_match")].plugin == "dskd_end_match"
    teacher_tok, student_tok = tokenizer("tinyllama"), tokenizer("gpt2")
    assert teacher_tok.get_vocab() != student_tok.get_vocab()
    aligner = registry.get("aligners", "end_match")(teacher_tok, student_tok)
    aligner = pickle.loads(pickle.dumps(aligner))  # it travels to data-loader workers
    assert member(aligner, Aligner, "fingerprint").startswith("end_match-1:")

    text = "Hi wörld 😀\nagain, of course"
    t_ids = teacher_tok(text, add_special_tokens=False)["input_ids"]
    s_ids = student_tok(text, add_special_tokens=False)["input_ids"]
    alignment = aligner.align(t_ids, torch.tensor(s_ids))
    assert alignment.is_monotonic() and 0 < len(alignment) <= min(len(t_ids), len(s_ids))
    # Each pair ends the same text (byte pairs inside the emoji included), read from the pieces independently.
    for t, s in alignment.pairs:
        assert llama_bytes(teacher_tok, t_ids[: t + 1]) == gpt2_bytes(student_tok, s_ids[: s + 1])

    vocab_map = aligner.vocab_map()
    assert vocab_map.shape == (len(teacher_tok),) and vocab_map.dtype == torch.int64
    world = teacher_tok.convert_tokens_to_ids("▁world")
    assert student_tok.convert_ids_to_tokens(int(vocab_map[world])) == "Ġworld"
    assert int((vocab_map >= 0).sum()) > 1000

    student, teacher = models("gpt2", "tinyllama")
    batch = make_batch(aligner)
    assert batch.aligned_rows.shape[0] > 0
    context = make_context(student, teacher, divergence=forward_kl, temperature=2.0, chunk_size=5, aligner=aligner)
    objective = registry.get("objectives", "dskd_v2")(context)
    result = run_objective(objective, student, teacher, batch, float(batch.num_student_tokens()), kd_rate=0.5)
    assert torch.isfinite(result.loss)
    kd_parts = {name: float(value) for name, value in result.terms.parts.items() if name != "ce"}
    assert kd_parts and all(np.isfinite(v) for v in kd_parts.values()) and any(v != 0 for v in kd_parts.values())
    assert float(result.terms.metrics["accepted_pairs"]) > 0
    result.loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert objective.projectors.t2s.weight.grad is not None and objective.projectors.t2s.weight.grad.abs().sum() > 0


def test_the_documented_objective_runs_through_objective_loss_and_the_policy_returns_lists(plugin_modules):
    registry = load_registry(extra_plugins=[plugin_modules["objective"], plugin_modules["policy"]])
    student, teacher = models("tinyllama", "tinyllama")
    batch = make_batch(None, "tinyllama", "tinyllama")
    context = make_context(
        student, teacher, "tinyllama", divergence=forward_kl, temperature=2.0, chunk_size=3, same_vocab=True
    )
    objective = registry.get("objectives", "agree_kd")(context)
    hidden = last_hidden_state(student, batch.student_input_ids, batch.student_attention_mask)
    signal = teacher.score(batch.teacher_input_ids, batch.teacher_attention_mask, batch.teacher_rows, objective.request)
    loss, terms = objective_loss(objective, batch, hidden, signal, kd_rate=0.5)
    n = batch.num_student_tokens()
    assert set(terms.parts) == {"ce", "kd"} and float(terms.counts["kd"]) == n
    assert 0 <= float(terms.metrics["agreement"]) <= n
    expected = (0.5 * terms.parts["ce"].detach() + 0.5 * terms.parts["kd"].detach()) / n
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert student.lm_head.weight.grad is not None and student.lm_head.weight.grad.abs().sum() > 0
    with pytest.raises(dskd.PluginError, match="agree_kd"):
        registry.get("objectives", "agree_kd")(make_context(student, teacher, "tinyllama", divergence=forward_kl))

    policy_context = types.SimpleNamespace(seed=7)  # the policy reads only the seed of its PolicyContext
    factory = registry.get("policies", "kd_dropout")
    policy = factory(policy_context, skip=0.5)
    state = policy.state_dict()
    first = [policy.prepare(make_batch(None, "tinyllama", "tinyllama"), step) for step in range(12)]
    assert all(isinstance(out, list) and len(out) == 1 for out in first)
    flags = [out[0].kd for out in first]
    assert True in flags and False in flags and all(out[0].ce for out in first)
    resumed = factory(policy_context, skip=0.5)
    resumed.load_state_dict(state)
    assert [resumed.prepare(make_batch(None, "tinyllama", "tinyllama"), s)[0].kd for s in range(12)] == flags
    assert member(policy, Policy, "prefetchable") is False
    member(policy, Policy, "observe")(0, {"train/loss": 1.0})  # the contract's default
    with pytest.raises(dskd.PluginError, match="skip"):
        factory(policy_context, skip=2.0)
