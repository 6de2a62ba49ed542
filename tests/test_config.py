"""`dskd.config`: TOML -> typed frozen tables, overrides, plugin options, and one `ConfigError` per config.

Configs are written as real files into a temporary job folder (with the data and model-config files they
name), so the path checks and the resolution against the file's folder run exactly as under `dskd run`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import typing
from pathlib import Path

import pytest

import dskd
from dskd.config import (
    Config,
    DataConfig,
    DivergenceConfig,
    EvalConfig,
    ObjectiveConfig,
    PolicyConfig,
    RunConfig,
    StudentConfig,
    TeacherConfig,
    TeacherSFTConfig,
    TrainConfig,
    apply_overrides,
    load_config,
    parse_config,
)
from dskd.errors import ConfigError, DskdError
from dskd.registry import load_registry

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------
# A job folder with every file a valid config names, and a minimal TOML writer for the configs under test.
# ---------------------------------------------------------------------------------------------------------

BASE = {
    "run": {"output_dir": "out", "stages": ["distill", "eval"]},
    "student": {"config": "student.json"},
    "teacher": {"config": "teacher.json"},
    "data": {"train": "train.jsonl", "test": "test.jsonl"},
}


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


def to_toml(raw: dict) -> str:
    lines = []
    for table, values in raw.items():
        lines.append(f"[{table}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def merged(base: dict, patch: dict) -> dict:
    """`base` with `patch`'s tables merged in; a value of None deletes the key."""
    out = {table: dict(values) for table, values in base.items()}
    for table, values in patch.items():
        section = out.setdefault(table, {})
        for key, value in values.items():
            if value is None:
                section.pop(key, None)
            else:
                section[key] = value
    return out


@pytest.fixture
def job(tmp_path: Path) -> Path:
    folder = tmp_path / "job"
    folder.mkdir()
    for name in ("student.json", "teacher.json"):
        (folder / name).write_text(json.dumps({"model_type": "llama", "vocab_size": 32000}))
    for name in ("train.jsonl", "test.jsonl", "valid.jsonl"):
        (folder / name).write_text('{"instruction": "Add 1 and 2.", "context": "", "response": "3"}\n')
    return folder


def write_job(folder: Path, raw: dict, prefix: str = "") -> Path:
    path = folder / "job.toml"
    path.write_text(prefix + to_toml(raw))
    return path


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def config_error(path: Path, overrides=(), registry=None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides), registry=registry)
    return info.value


# ---------------------------------------------------------------------------------------------------------
# Defaults and parsing
# ---------------------------------------------------------------------------------------------------------


def test_defaults_are_the_documented_ones():
    config = Config()
    assert config.run.stages == ("distill", "eval")
    assert config.run.output_dir == "runs/default"
    assert config.train.lr == 5e-4 and config.train.max_steps == 100 and config.train.schedule == "cosine"
    assert config.objective.name == "kd" and config.objective.kd_rate == 0.5 and config.objective.options == {}
    assert config.divergence.name == "forward_kl"
    assert config.aligner.name == ""
    assert config.policy.name == ""  # the policy that declares itself the default (off_policy)
    assert config.teacher.address == () and config.teacher.wire_dtype == "bfloat16"
    assert config.eval.seeds == (0,)


def test_tables_missing_from_the_file_take_their_defaults(job: Path):
    config = load_config(write_job(job, BASE))
    assert config.train == TrainConfig()
    assert config.eval == EvalConfig()
    assert config.teacher_sft == TeacherSFTConfig()
    assert config.divergence == DivergenceConfig()
    assert config.source == str(job / "job.toml")


def test_every_key_of_every_table_parses_to_its_declared_type(job: Path, registry):
    # A non-default value for every key, so a key that is parsed into the wrong field or dropped fails here.
    raw = {
        "run": {
            "output_dir": "runs/x",
            "seed": 7,
            "stages": ["teacher_sft", "distill", "eval"],
            "deterministic": True,
            "log_every": 3,
        },
        "student": {
            "model": "org/student",
            "config": "student.json",
            "tokenizer": "org/student-tok",
            "dtype": "bfloat16",
            "gguf_file": "",  # non-empty needs a model folder holding the file (tested in test_models_gguf.py)
            "gradient_checkpointing": True,
            "chat_template": "",
            "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
            "merge_lora": True,
        },
        "teacher": {
            "model": "",
            "config": "teacher.json",
            "tokenizer": "org/teacher-tok",
            "dtype": "bfloat16",
            "gguf_file": "",
            "address": [],
            "auth_token_env": "TEACHER_TOKEN",
            "tls_ca_file": "",
            "timeout_s": 30,
            "retry_timeout_s": 60,
            "wire_dtype": "float32",
            "cache_dir": "teacher-cache",
            "store": "",  # a store must exist to validate; tests/test_store_*.py parse real ones
            "chat_template": "",
        },
        "teacher_sft": {"steps": 5, "lr": 0.002, "batch_size": 4, "warmup_steps": 1},
        "data": {
            "train": "train.jsonl",
            "valid": "valid.jsonl",
            "test": "test.jsonl",
            "instruction_field": "q",
            "context_field": "input",
            "response_field": "a",
            "prompt_field": "prompt",
            "template": "Q: {instruction} {context}",
            "max_length": 64,
            "max_prompt_length": 32,
            "num_workers": 2,
            "cache_dir": "data-cache",
            "subset": "en",
            "split": "train[:90%]",
            "valid_split": "dev",
            "test_split": "heldout",
            "data_files": ["data/part-*.parquet"],
            "streaming": True,
            "format": "instruction",
            "messages_field": "conversation",
            "completion_field": "answer",
            "train_on": "last",
        },
        "train": {
            "max_steps": 9,
            "batch_size": 2,
            "grad_accum": 4,
            "lr": 0.001,
            "projector_lr": 0.003,
            "weight_decay": 0.0,
            "warmup_steps": 2,
            "schedule": "linear",
            "min_lr_ratio": 0.1,
            "clip_grad": 0.5,
            "precision": "bf16",
            "save_every": 3,
            "save_every_minutes": 2.5,
            "keep_checkpoints": 1,
            "max_bad_steps": 5,
            "chunk_size": 16,
            "sharding": "fsdp",
        },
        "objective": {"name": "kd", "kd_rate": 0.25, "temperature": 2.0, "teacher_signal": "top_k", "top_k": 8},
        "divergence": {"name": "skew_forward_kl", "lam": 0.3},
        "aligner": {"name": ""},
        "policy": {"name": "off_policy"},
        "eval": {
            "split": "valid",
            "max_new_tokens": 8,
            "batch_size": 4,
            "temperature": 0.7,
            "top_p": 0.9,
            "seeds": [1, 2],
            "max_samples": 5,
        },
    }
    # [[teachers]] replaces [teacher] (a job has one or the other): its keys are covered by tests/test_multi_teacher_config.py.
    tables = {f.name for f in dataclasses.fields(Config)} - {"source", "teachers"}
    assert set(raw) == tables
    for name in tables:  # the literal above must cover every key, so a new field must be added here too
        fields = {f.name for f in dataclasses.fields(getattr(Config(), name))} - {"options"}
        assert fields <= set(raw[name]), f"[{name}] keys not covered: {sorted(fields - set(raw[name]))}"

    config = load_config(write_job(job, raw), registry=registry)
    for table, values in raw.items():
        section = getattr(config, table)
        hints = typing.get_type_hints(type(section))
        for key, value in values.items():
            if key not in hints or key == "options":
                assert section.options[key] == value
                continue
            got = getattr(section, key)
            if key in ("output_dir", "config", "train", "valid", "test", "cache_dir") and value:
                assert got == str((job / value).resolve())
            elif isinstance(value, list):
                assert got == tuple(value) and isinstance(got, tuple)
            else:
                assert got == value
                assert isinstance(got, typing.get_origin(hints[key]) or hints[key])
    assert isinstance(config.teacher.timeout_s, float)  # an integer is accepted for a float key, as a float
    assert config.student.tokenizer == "org/student-tok"  # a hub id that is no local path stays as written


def test_to_dict_round_trips_through_parse_config(job: Path, registry):
    raw = merged(
        BASE,
        {
            "objective": {"name": "kd", "top_k": 16},
            "divergence": {"name": "generalized_jsd", "beta": 0.2},
            "eval": {"seeds": [3, 4]},
        },
    )
    config = load_config(write_job(job, raw), registry=registry)
    again = parse_config(config.to_dict(), source=config.source, registry=registry)
    assert again == config
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()  # plain JSON types, for config.json


# ---------------------------------------------------------------------------------------------------------
# Problems: suggestions, types, collection
# ---------------------------------------------------------------------------------------------------------


def test_unknown_table_suggests_the_closest_table(job: Path):
    error = config_error(write_job(job, merged(BASE, {"trian": {"lr": 0.1}})))
    assert str(error) == f"{job / 'job.toml'}: trian: unknown table; did you mean 'train'?"


def test_unknown_key_suggests_the_closest_key(job: Path):
    error = config_error(write_job(job, merged(BASE, {"train": {"max_step": 10}})))
    assert [str(p) for p in error.problems] == ["train.max_step: unknown key; did you mean 'max_steps'?"]


def test_unknown_key_with_no_close_match_lists_the_known_keys(job: Path):
    error = config_error(write_job(job, merged(BASE, {"teacher_sft": {"zzz": 1}})))
    assert "known keys: batch_size, lr, steps, warmup_steps" in str(error)


@pytest.mark.parametrize(
    ("table", "key", "value", "expected"),
    [
        ("train", "lr", "fast", "expected a number, got 'fast'"),
        ("train", "max_steps", 2.5, "expected an integer, got 2.5"),
        ("train", "batch_size", True, "expected an integer, got True"),
        ("run", "deterministic", "yes", "expected true or false, got 'yes'"),
        ("run", "stages", [1, 2], "expected a list of strings, got [1, 2]"),
        ("eval", "seeds", ["a"], "expected a list of integers, got ['a']"),
    ],
)
def test_wrong_type_names_the_key_and_the_expected_type(job: Path, table, key, value, expected):
    error = config_error(write_job(job, merged(BASE, {table: {key: value}})))
    assert len(error.problems) == 1
    assert error.problems[0].key == f"{table}.{key}"
    assert expected in str(error)


def test_several_problems_are_reported_together_in_one_error(job: Path):
    raw = merged(BASE, {"train": {"lrr": 1, "batch_size": "eight"}, "eval": {"top_p": "all"}, "trian": {}})
    error = config_error(write_job(job, raw))
    assert sorted(p.key for p in error.problems) == ["eval.top_p", "train.batch_size", "train.lrr", "trian"]
    assert str(error).startswith(f"{job / 'job.toml'}: 4 problems: ")
    assert "\n" not in str(error)


def test_range_and_plugin_problems_are_reported_together(job: Path, registry):
    raw = merged(BASE, {"train": {"lr": -1.0, "schedule": "step"}, "divergence": {"name": "nope"}})
    error = config_error(write_job(job, raw), registry=registry)
    assert sorted(p.key for p in error.problems) == ["divergence.name", "train.lr", "train.schedule"]


def test_a_list_key_accepts_a_single_string(job: Path):
    config = load_config(write_job(job, merged(BASE, {"run": {"stages": "distill"}})))
    assert config.run.stages == ("distill",)


# ---------------------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_folder_from_any_cwd(job: Path, tmp_path: Path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    raw = merged(
        BASE,
        {"run": {"output_dir": "runs/first"}, "data": {"cache_dir": "./cache"}, "student": {"model": "org/some-model"}},
    )
    config = load_config(Path(os.path.relpath(write_job(job, raw), elsewhere)))
    assert config.data.train == str(job / "train.jsonl")
    assert config.data.test == str(job / "test.jsonl")
    assert config.student.config == str(job / "student.json")
    # output_dir does not exist yet and looks like "org/name": it must still land beside the config.
    assert config.run.output_dir == str(job / "runs" / "first")
    assert config.data.cache_dir == str(job / "cache")
    assert config.student.model == "org/some-model"  # a hub id stays a hub id


def test_absolute_paths_are_kept(job: Path):
    config = load_config(write_job(job, merged(BASE, {"data": {"train": str(job / "train.jsonl")}})))
    assert config.data.train == str(job / "train.jsonl")


def test_the_default_job_validates_from_another_cwd(tmp_path: Path, monkeypatch, registry):
    monkeypatch.chdir(tmp_path)
    config = load_config(REPO / "dskd.toml", registry=registry)
    assert Path(config.data.train) == REPO / "examples" / "data" / "tasks" / "train.jsonl"
    assert Path(config.run.output_dir) == REPO / "runs" / "default"


# ---------------------------------------------------------------------------------------------------------
# --set overrides
# ---------------------------------------------------------------------------------------------------------


def test_overrides_are_read_as_toml_values(job: Path):
    path = write_job(job, BASE)
    config = load_config(
        path,
        ["train.lr=3e-4", "train.max_steps=7", "run.deterministic=true", "eval.seeds=[1, 2]", 'objective.name="sft"'],
    )
    assert config.train.lr == 3e-4 and config.train.max_steps == 7
    assert config.run.deterministic is True
    assert config.eval.seeds == (1, 2)
    assert config.objective.name == "sft"


def test_overrides_that_are_not_toml_are_bare_strings(job: Path):
    config = load_config(
        write_job(job, BASE), ["divergence.name=js", "run.output_dir=runs/over", "teacher.address=127.0.0.1:50051"]
    )
    assert config.divergence.name == "js"
    assert config.run.output_dir == str(job / "runs" / "over")
    assert config.teacher.address == ("127.0.0.1:50051",)


def test_override_replaces_the_value_in_the_file(job: Path):
    config = load_config(write_job(job, merged(BASE, {"train": {"lr": 0.1}})), ["train.lr=0.2"])
    assert config.train.lr == 0.2


def test_override_is_type_checked(job: Path):
    error = config_error(write_job(job, BASE), ["train.max_steps=many"])
    assert [str(p) for p in error.problems] == [
        "train.max_steps: expected an integer, got 'many'; write max_steps = <an integer>"
    ]


def test_override_of_an_unknown_key_is_rejected_with_a_suggestion(job: Path):
    error = config_error(write_job(job, BASE), ["train.lrr=1"])
    assert [str(p) for p in error.problems] == ["train.lrr: unknown key; did you mean 'lr'?"]


def test_override_of_an_unknown_table_is_rejected_with_a_suggestion(job: Path):
    error = config_error(write_job(job, BASE), ["trainn.lr=1"])
    assert [str(p) for p in error.problems] == ["--set trainn.lr: unknown table 'trainn'; did you mean 'train'?"]


@pytest.mark.parametrize("override", ["train.lr", "trainlr=1", "=1", "train.=1"])
def test_malformed_override_says_the_expected_form(job: Path, override):
    error = config_error(write_job(job, BASE), [override])
    assert [p.problem for p in error.problems] == ["expected table.key=value"]
    assert "--set train.lr=3e-4" in str(error)


def test_override_into_a_key_that_is_not_a_table_is_a_problem_not_a_crash():
    raw = {"train": 3}
    problems = apply_overrides(raw, ["train.lr=0.1"])
    assert [str(p) for p in problems] == ["train: must be a table, got int; write [train] with keys under it"]


# ---------------------------------------------------------------------------------------------------------
# Plugin names and options against a registry
# ---------------------------------------------------------------------------------------------------------


class OptionsPlugin:
    """A divergence whose options cover the default types the config checks (float, int, str, bool, tuple, None)."""

    @staticmethod
    def shaped_kl(
        student_logits,
        teacher_logits,
        *,
        temperature=1.0,
        weight=0.5,
        steps=3,
        mode="sum",
        exact=False,
        ids=("a",),
        sizes=(1, 2),
        anything=None,
    ):
        raise AssertionError("never called by config validation")

    @dskd.hookimpl
    def dskd_register_divergences(self, register):
        register("shaped_kl", self.shaped_kl)


@pytest.fixture(scope="module")
def options_registry():
    return load_registry(extra_plugins=[OptionsPlugin()])


def test_unknown_plugin_name_lists_the_known_ones(job: Path, registry):
    error = config_error(write_job(job, merged(BASE, {"divergence": {"name": "hellinger"}})), registry=registry)
    message = str(error)
    assert "divergence.name: unknown divergence 'hellinger'; known: " in message
    assert all(name in message for name in ("forward_kl", "reverse_kl", "js", "tvd", "generalized_jsd"))


def test_plugin_names_are_not_checked_without_a_registry(job: Path):
    config = load_config(write_job(job, merged(BASE, {"divergence": {"name": "hellinger", "alpha": 2}})))
    assert config.divergence.name == "hellinger" and config.divergence.options == {"alpha": 2}


def test_plugin_options_are_accepted_and_converted(job: Path, options_registry):
    raw = merged(
        BASE,
        {
            "divergence": {
                "name": "shaped_kl",
                "weight": 1,
                "steps": 4,
                "mode": "max",
                "exact": True,
                "ids": ["b", "c"],
                "sizes": [3],
                "anything": [1, "x"],
            }
        },
    )
    config = load_config(write_job(job, raw), registry=options_registry)
    assert config.divergence.options == {
        "weight": 1,
        "steps": 4,
        "mode": "max",
        "exact": True,
        "ids": ["b", "c"],
        "sizes": [3],
        "anything": [1, "x"],
    }


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("weight", "heavy", "divergence.weight: expected a number, got 'heavy'; the default is 0.5"),
        ("steps", 1.5, "divergence.steps: expected an integer, got 1.5; the default is 3"),
        ("mode", 3, "divergence.mode: expected a string, got 3; the default is 'sum'"),
        ("exact", 1, "divergence.exact: expected true or false, got 1; the default is False"),
        ("ids", [1], "divergence.ids: expected a list of strings, got [1]; the default is ('a',)"),
        ("sizes", ["a"], "divergence.sizes: expected a list of integers, got ['a']; the default is (1, 2)"),
        ("wieght", 0.1, "divergence.wieght: unknown option of divergence 'shaped_kl'; did you mean 'weight'?"),
        ("temperature", 2.0, "divergence.temperature: unknown option of divergence 'shaped_kl'"),
    ],
)
def test_plugin_options_are_checked_against_the_signature(job: Path, options_registry, option, value, expected):
    raw = merged(BASE, {"divergence": {"name": "shaped_kl", option: value}})
    error = config_error(write_job(job, raw), registry=options_registry)
    assert len(error.problems) == 1
    assert expected in str(error)


def test_objective_options_come_from_the_objective_signature(job: Path, registry):
    config = load_config(write_job(job, merged(BASE, {"objective": {"name": "kd", "top_k": 16}})), registry=registry)
    assert config.objective.options == {"top_k": 16}
    error = config_error(write_job(job, merged(BASE, {"objective": {"name": "sft", "top_k": 16}})), registry=registry)
    assert "objective.top_k: unknown option of objective 'sft'; 'sft' takes no options" in str(error)


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------


def test_missing_file_is_one_config_error(tmp_path: Path):
    path = tmp_path / "nope.toml"
    error = config_error(path)
    assert isinstance(error, DskdError)
    assert "file not found" in str(error) and str(path) in str(error) and "\n" not in str(error)


def test_invalid_toml_is_one_config_error_naming_the_line(tmp_path: Path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nlr = \n")
    error = config_error(path)
    assert "not valid TOML" in str(error) and "line 2" in str(error) and "\n" not in str(error)


@pytest.mark.parametrize("make", ["directory", "not_utf8"])
def test_unreadable_file_is_one_config_error(tmp_path: Path, make):
    path = tmp_path / "job.toml"
    if make == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"[train]\nlr = 0.1 # \xff\xfe\n")
    error = config_error(path)
    assert "cannot be read" in str(error) and "\n" not in str(error)


# ---------------------------------------------------------------------------------------------------------
# At least 20 malformed configs, each with exactly one problem and a one-line message (issue 7)
# ---------------------------------------------------------------------------------------------------------

MALFORMED = [
    # (id, patch of BASE or None, text prefix, expected key, expected fragment of the message)
    ("unknown-table", {"trian": {"lr": 0.1}}, "", "trian", "unknown table; did you mean 'train'?"),
    ("unknown-key", {"train": {"lrr": 0.1}}, "", "train.lrr", "unknown key; did you mean 'lr'?"),
    ("string-for-float", {"train": {"lr": "fast"}}, "", "train.lr", "expected a number, got 'fast'"),
    ("float-for-int", {"train": {"max_steps": 1.5}}, "", "train.max_steps", "expected an integer, got 1.5"),
    ("bool-for-int", {"eval": {"batch_size": True}}, "", "eval.batch_size", "expected an integer, got True"),
    ("string-for-bool", {"run": {"deterministic": "yes"}}, "", "run.deterministic", "expected true or false"),
    ("list-of-wrong-type", {"run": {"stages": [1]}}, "", "run.stages", "expected a list of strings"),
    ("scalar-for-table", None, "train = 3\n", "train", "must be a table, got int"),
    ("unknown-stage", {"run": {"stages": ["distil"]}}, "", "run.stages", "unknown stage 'distil'"),
    ("zero-log-every", {"run": {"log_every": 0}}, "", "run.log_every", "must be >= 1, got 0"),
    ("unknown-schedule", {"train": {"schedule": "step"}}, "", "train.schedule", "unknown schedule 'step'"),
    ("zero-lr", {"train": {"lr": 0}}, "", "train.lr", "must be > 0"),
    ("min-lr-ratio-above-one", {"train": {"min_lr_ratio": 1.5}}, "", "train.min_lr_ratio", "must be in [0, 1]"),
    ("unknown-precision", {"train": {"precision": "fp16"}}, "", "train.precision", "unknown precision 'fp16'"),
    ("kd-rate-above-one", {"objective": {"kd_rate": 2}}, "", "objective.kd_rate", "must be in [0, 1], got 2"),
    ("zero-temperature", {"objective": {"temperature": 0}}, "", "objective.temperature", "must be > 0"),
    (
        "prompt-longer-than-max",
        {"data": {"max_prompt_length": 600}},
        "",
        "data.max_prompt_length",
        "must be in (0, max_length), got 600",
    ),
    ("missing-train-file", {"data": {"train": "missing.jsonl"}}, "", "data.train", "file not found"),
    ("eval-without-test-split", {"data": {"test": None}}, "", "data.test", "is empty but the eval stage needs it"),
    ("unknown-dtype", {"student": {"dtype": "float16"}}, "", "student.dtype", "unknown dtype 'float16'"),
    ("no-student", {"student": {"config": None}}, "", "student", "neither model nor config is set"),
    ("no-teacher", {"teacher": {"config": None}}, "", "teacher", "no teacher"),
    ("address-without-port", {"teacher": {"address": ["localhost"]}}, "", "teacher.address", "is not host:port"),
    ("negative-timeout", {"teacher": {"timeout_s": -1}}, "", "teacher.timeout_s", "must be > 0"),
    ("negative-retry-timeout", {"teacher": {"retry_timeout_s": -5}}, "", "teacher.retry_timeout_s", "must be >= 0"),
    (
        "negative-save-every-minutes",
        {"train": {"save_every_minutes": -1}},
        "",
        "train.save_every_minutes",
        "must be >= 0",
    ),
    ("unknown-wire-dtype", {"teacher": {"wire_dtype": "fp8"}}, "", "teacher.wire_dtype", "unknown dtype 'fp8'"),
    (
        "teacher-sft-without-steps",
        {"run": {"stages": ["teacher_sft", "distill"]}},
        "",
        "teacher_sft.steps",
        "must be > 0 when the teacher_sft stage runs",
    ),
    ("unknown-eval-split", {"eval": {"split": "dev"}}, "", "eval.split", "unknown split 'dev'"),
    ("top-p-zero", {"eval": {"top_p": 0}}, "", "eval.top_p", "must be in (0, 1]"),
    ("empty-seeds", {"eval": {"seeds": []}}, "", "eval.seeds", "is empty"),
    ("unknown-divergence", {"divergence": {"name": "hellinger"}}, "", "divergence.name", "known: adaptive_kl"),
    ("unknown-policy", {"policy": {"name": "on_polcy"}}, "", "policy.name", "unknown policy 'on_polcy'"),
    (
        "option-of-optionless-plugin",
        {"divergence": {"lam": 0.2}},
        "",
        "divergence.lam",
        "'forward_kl' takes no options",
    ),
    (
        "misspelt-option",
        {"divergence": {"name": "skew_forward_kl", "lamb": 0.2}},
        "",
        "divergence.lamb",
        "did you mean 'lam'?",
    ),
    ("option-of-wrong-type", {"objective": {"top_k": "many"}}, "", "objective.top_k", "expected an integer"),
]


@pytest.mark.parametrize(("case", "patch", "prefix", "key", "fragment"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_config_gives_one_line_naming_the_key(job: Path, registry, case, patch, prefix, key, fragment):
    base = BASE if patch is None else merged(BASE, patch)
    if prefix:  # a top-level key must come before the tables, and must not also be written as a table
        base = {table: values for table, values in base.items() if f"{table} =" not in prefix}
    error = config_error(write_job(job, base, prefix), registry=registry)
    message = str(error)
    assert [p.key for p in error.problems] == [key], message
    assert fragment in message
    assert "\n" not in message
    assert message.startswith(f"{job / 'job.toml'}: {key}: ")


def test_there_are_at_least_twenty_malformed_configs():
    assert len({case[0] for case in MALFORMED}) >= 20


# ---------------------------------------------------------------------------------------------------------
# docs/config.md is generated from the dataclasses
# ---------------------------------------------------------------------------------------------------------


def load_docs_script():
    spec = importlib.util.spec_from_file_location("make_config_docs", REPO / "docs" / "make_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_docs_equal_the_generator_output():
    script = load_docs_script()
    committed = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    assert committed == script.render(), "docs/config.md is stale: run python docs/make_config_docs.py"


def test_config_docs_list_every_key_with_its_default():
    text = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    for table_field in dataclasses.fields(Config):
        if table_field.name in ("source", "teachers"):  # [[teachers]]: tests/test_multi_teacher_config.py
            continue
        assert f"## [{table_field.name}]" in text
        section = getattr(Config(), table_field.name)
        for f in dataclasses.fields(section):
            if f.name != "options":
                assert f"| `{f.name}` |" in text


def test_every_config_field_has_a_docstring():
    script = load_docs_script()
    for cls in (
        RunConfig,
        StudentConfig,
        TeacherConfig,
        TeacherSFTConfig,
        DataConfig,
        TrainConfig,
        ObjectiveConfig,
        DivergenceConfig,
        PolicyConfig,
        EvalConfig,
    ):
        docs = script.attribute_docstrings(cls)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in docs]
        assert not missing, f"{cls.__name__}: no docstring for {missing}"
