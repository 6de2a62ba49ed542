"""`dskd.toml` -> typed, frozen dataclasses, one per table; every problem collected and reported together.

Each field has a default and an attribute docstring (shown by `docs/config.md` and `dskd validate`). Plugin
tables (`[objective]`, `[divergence]`, `[aligner]`, `[policy]`) hold `name` plus the plugin's own options,
which are validated against the plugin's signature (`dskd.registry.option_defaults`). Relative paths are
resolved against the directory of the config file, so a job runs the same from any working directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from dskd.config_teachers import (
    TeacherEntry,
    apply_teacher_override,
    parse_teachers,
    teachers_plugin_problems,
    teachers_value_problems,
)
from dskd.errors import ConfigError, ConfigProblem
from dskd.models.gguf import gguf_path
from dskd.models.lora import lora_problems


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = "runs/default"
    """Run directory: resolved config, metrics.jsonl, checkpoints, final student, results."""
    seed: int = 0
    """Seed of every random stream (model init, data order, dropout, sampling)."""
    stages: tuple[str, ...] = ("distill", "eval")
    """Stages to run, in order: any of "teacher_sft", "distill", "eval"."""
    deterministic: bool = False
    """Use deterministic torch kernels (slower; makes resumed runs bit-identical on one device)."""
    log_every: int = 10
    """Optimizer steps between metric reductions, progress updates and metrics.jsonl lines."""


@dataclass(frozen=True)
class ModelConfig:
    model: str = ""
    """Pretrained weights: a local directory or a hub id. Empty: build from `config` with random weights."""
    config: str = ""
    """An HF config.json (or its directory) to build a randomly initialised model from, when `model` is empty."""
    tokenizer: str = ""
    """Tokenizer directory or hub id. Empty: the one saved with `model`."""
    dtype: str = "float32"
    """Weights dtype: "float32" or "bfloat16"."""
    chat_template: str = ""
    """A Jinja chat template file (.jinja) for conversation data, used instead of the tokenizer's own `chat_template`
    (needed for a tokenizer without one, e.g. GPT-2). Empty: the tokenizer's."""
    gguf_file: str = ""
    """A GGUF file (llama.cpp format) inside the folder `model`. Empty: `model` is a checkpoint folder, a hub id or
    itself a `.gguf` file. A GGUF model is converted once to a float32 checkpoint cached by content hash."""


@dataclass(frozen=True)
class StudentConfig(ModelConfig):
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, about 30% more time)."""
    lora: dict = field(default_factory=dict)
    """LoRA adapters through peft, e.g. { r = 16, alpha = 32, dropout = 0.05, target_modules = ["q_proj", "v_proj"] }: only
    the adapters (and the objective's projectors) train; the LM head stays frozen unless its name is in target_modules.
    Needs pretrained weights (student.model). Empty: full fine-tuning."""
    merge_lora: bool = False
    """With lora: final/ holds the merged model (an ordinary Hugging Face model) and the adapter in final/adapter/;
    without it, final/ holds the adapter alone."""


@dataclass(frozen=True)
class TeacherConfig(ModelConfig):
    address: tuple[str, ...] = ()
    """gRPC teacher servers ("host:port"). Empty: the teacher runs in this process."""
    auth_token_env: str = ""
    """Name of the environment variable holding the servers' bearer token (never the token itself)."""
    tls_ca_file: str = ""
    """CA certificate (PEM) to verify the servers' TLS certificates. Empty: plaintext."""
    timeout_s: float = 120.0
    """Deadline of one teacher call, in seconds."""
    retry_timeout_s: float = 300.0
    """How long, in seconds, to keep retrying while no teacher server answers (a restart, a network outage), with a
    capped exponential backoff, before the run checkpoints and stops (resume it with --resume). 0: give up at once."""
    wire_dtype: str = "bfloat16"
    """Dtype of hidden states and log-probabilities on the wire: "bfloat16" or "float32"."""
    cache_dir: str = ""
    """Where a remote teacher's tokenizer and LM head are cached (by fingerprint). Empty: ~/.cache/dskd."""
    dtype: str = "auto"
    """Weights dtype of an in-process teacher: "auto" (float32 on CPU, bfloat16 on CUDA, as a teacher server by default), "float32" or "bfloat16"."""
    store: str = ""
    """A teacher store (`dskd teacher-store build`): the teacher's signal is read from this folder, with no teacher process. When model, config or address is also set, the store must be that teacher's."""


@dataclass(frozen=True)
class TeacherSFTConfig:
    steps: int = 0
    """Optimizer steps of supervised fine-tuning of the teacher (stage "teacher_sft")."""
    lr: float = 1e-3
    """Peak learning rate of the teacher SFT."""
    batch_size: int = 16
    """Sequences per teacher SFT step."""
    warmup_steps: int = 0
    """Linear warm-up steps of the teacher SFT."""


@dataclass(frozen=True)
class DataConfig:
    train: str = ""
    """Training split: a data file (jsonl, json, parquet, csv, arrow), a save_to_disk folder, or a hub dataset name."""
    valid: str = ""
    """Validation split (held-out distillation metrics), a source like data.train. Optional."""
    test: str = ""
    """Test split (generation evaluation), a source like data.train. Optional."""
    subset: str = ""
    """Configuration (subset) of a hub dataset, e.g. "default". Empty: the dataset's only or default one."""
    split: str = "train"
    """Split that data.train reads from a hub dataset or a saved DatasetDict."""
    valid_split: str = "validation"
    """Split that data.valid reads from a hub dataset or a saved DatasetDict."""
    test_split: str = "test"
    """Split that data.test reads from a hub dataset or a saved DatasetDict."""
    data_files: tuple[str, ...] = ()
    """Files (or glob patterns) of a hub dataset or a local folder of data files to read; empty: all of them."""
    streaming: bool = False
    """Read data.train as a stream, in order, tokenising and aligning on the fly (a corpus larger than memory);
    a checkpoint records the position in the stream. The run stops with an error if the stream ends first."""
    instruction_field: str = "instruction"
    """Field holding the instruction (Dolly: instruction)."""
    context_field: str = "context"
    """Field holding optional context (Dolly: context; Alpaca: input). Missing or empty: no context section."""
    response_field: str = "response"
    """Field holding the response: a string, or a list of references (the first is trained on)."""
    prompt_field: str = ""
    """If set, a field holding the complete prompt text, used verbatim instead of the template."""
    template: str = "alpaca"
    """Prompt template: "alpaca" or a string with {instruction} and {context} placeholders."""
    max_length: int = 512
    """Maximum tokens of prompt plus response, per tokenizer. Longer samples are an error (never silently cut)."""
    max_prompt_length: int = 256
    """Prompts longer than this keep their *last* tokens, so the "### Response:" cue survives."""
    num_workers: int = 0
    """Processes that tokenise and align the data (0: in the main process)."""
    cache_dir: str = ""
    """Cache of tokenised and aligned splits, keyed by data and tokenizer fingerprints. Empty: <output_dir>/cache."""
    format: str = "auto"
    """Record shape: "auto" (detected from the fields), "instruction" (instruction/context/response and the template),
    "prompt_completion" (TRL's `prompt`/`completion`), or "conversation" (`messages`, each model's chat template)."""
    messages_field: str = "messages"
    """Field holding a conversation: a list of {role, content} with roles system, user, assistant."""
    completion_field: str = "completion"
    """Field holding the completion of prompt/completion records (the prompt is data.prompt_field, else "prompt")."""
    train_on: str = "all"
    """Conversations: the assistant turns that are labels, "all" or "last" (the final one only)."""


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 100
    """Optimizer steps of distillation."""
    batch_size: int = 8
    """Sequences per micro-batch (per process)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 5e-4
    """Peak learning rate of the student."""
    projector_lr: float = 1e-3
    """Peak learning rate of an objective's projectors (DSKD)."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and norms)."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    schedule: str = "cosine"
    """Learning-rate decay after warm-up: "cosine", "linear" or "constant"."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak (cosine and linear)."""
    clip_grad: float = 1.0
    """Gradient-norm clipping (0 disables)."""
    precision: str = "fp32"
    """"fp32" or "bf16" (autocast; losses are always computed in float32)."""
    save_every: int = 0
    """Optimizer steps between resumable checkpoints (0: by time only, see save_every_minutes)."""
    save_every_minutes: float = 10.0
    """Minutes between resumable checkpoints, so that a crash costs at most this much training (0: by steps only)."""
    keep_checkpoints: int = 2
    """Resumable checkpoints kept on disk (the newest)."""
    max_bad_steps: int = 3
    """Consecutive steps with a non-finite loss or gradient norm (each skipped, no update) after which the run stops."""
    chunk_size: int = 0
    """Token rows per chunk of the loss (bounds the memory of full-vocabulary logits). 0: 2**24 / vocabulary rows."""
    sharding: str = "none"
    """"none" (each process holds the whole student; DDP with several) or "fsdp" (FSDP2: the student's weights, gradients
    and optimizer state are sharded over the processes; needs 2 or more). accelerate's FSDP plugin (version 2) selects fsdp too."""


@dataclass(frozen=True)
class ObjectiveConfig:
    name: str = "kd"
    """Objective plugin: sft, kd, dskd, dskd_v2, ... (see `dskd plugins`)."""
    kd_rate: float = 0.5
    """Weight of the distillation loss; the CE on gold labels gets 1 - kd_rate (spec §1.3)."""
    temperature: float = 1.0
    """Divergence temperature (divides student and teacher logits)."""
    options: dict = field(default_factory=dict)
    """The plugin's own options (the other keys of the table)."""


@dataclass(frozen=True)
class PluginConfig:
    name: str = ""
    """Plugin name (see `dskd plugins`)."""
    options: dict = field(default_factory=dict)
    """The plugin's own options (the other keys of the table)."""


@dataclass(frozen=True)
class DivergenceConfig(PluginConfig):
    name: str = "forward_kl"
    """Divergence plugin: forward_kl, reverse_kl, js, tvd, skew_forward_kl, skew_reverse_kl, adaptive_kl, generalized_jsd."""


@dataclass(frozen=True)
class AlignerConfig(PluginConfig):
    name: str = ""
    """Aligner plugin. Empty: none for the same vocabulary, otherwise the objective's own default (uld: index, mined_kd: mined) or eta."""


@dataclass(frozen=True)
class PolicyConfig(PluginConfig):
    name: str = ""
    """Policy plugin: off_policy, on_policy, mixed, teacher_generated, adaptive; empty: the default one (off_policy)."""


@dataclass(frozen=True)
class EvalConfig:
    split: str = "test"
    """Split to evaluate by generation: "test" or "valid"."""
    max_new_tokens: int = 64
    """Tokens generated per prompt."""
    batch_size: int = 32
    """Prompts per generation batch."""
    temperature: float = 0.0
    """Sampling temperature; 0 is greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass (with temperature > 0)."""
    seeds: tuple[int, ...] = (0,)
    """Generation seeds; metrics are averaged over them."""
    max_samples: int = 0
    """Evaluate at most this many examples (0: all)."""


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    teacher_sft: TeacherSFTConfig = field(default_factory=TeacherSFTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    aligner: AlignerConfig = field(default_factory=AlignerConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    teachers: tuple[TeacherEntry, ...] = ()
    """`[[teachers]]`: several teachers, each a whole [teacher] table plus name, weight, aligner and route
    (`dskd.config_teachers`). Empty: the one [teacher]."""
    source: str = ""
    """Path of the file this config was read from (not a table)."""

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "source":
                continue
            if f.name == "teachers":  # an array of tables, written only when the job has one (as in its TOML)
                if self.teachers:
                    out["teachers"] = [entry.to_dict() for entry in self.teachers]
                continue
            table = dataclasses.asdict(getattr(self, f.name))
            options = table.pop("options", None)
            if options:
                table.update(options)
            out[f.name] = {k: list(v) if isinstance(v, tuple) else v for k, v in table.items()}
        return out


PLUGIN_TABLES = {"objective": "objectives", "divergence": "divergences", "aligner": "aligners", "policy": "policies"}
STAGES = ("teacher_sft", "distill", "eval")
SHARDINGS = ("none", "fsdp")
PATH_FIELDS = {
    ("student", "model"),
    ("student", "config"),
    ("student", "tokenizer"),
    ("teacher", "model"),
    ("teacher", "config"),
    ("teacher", "tokenizer"),
    ("teacher", "tls_ca_file"),
    ("teacher", "cache_dir"),
    ("teacher", "store"),
    ("teacher", "chat_template"),
    ("student", "chat_template"),
    ("data", "train"),
    ("data", "valid"),
    ("data", "test"),
    ("data", "cache_dir"),
    ("run", "output_dir"),
}
# Only these may name a Hugging Face hub id ("org/name"); every other path field is always a local path.
HUB_FIELDS = {("student", "model"), ("student", "tokenizer"), ("teacher", "model"), ("teacher", "tokenizer")}


def _tables() -> dict[str, type]:
    # `teachers` is an array of tables, parsed by `dskd.config_teachers`.
    return {f.name: _hints(Config)[f.name] for f in dataclasses.fields(Config) if f.name not in ("source", "teachers")}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _closest(word: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f"did you mean {match[0]!r}?" if match else f"known keys: {', '.join(sorted(choices))}"


_PLURAL = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is tuple:
        inner = typing.get_args(tp)[0]
        return f"a list of {_PLURAL.get(inner, _type_name(inner))}"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a table"}.get(
        tp, str(tp)
    )


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, value converted to `tp`): ints are accepted for floats, lists become tuples."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        if isinstance(value, str):  # a single string where a list is expected: accept it as a one-item list
            value = [value]
        if not isinstance(value, list):
            return False, value
        inner = typing.get_args(tp)[0]
        items = []
        for item in value:
            ok, item = _coerce(item, inner)
            if not ok:
                return False, value
            items.append(item)
        return True, tuple(items)
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if tp is dict:
        return isinstance(value, dict), value
    return True, value


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError([ConfigProblem("", "file not found", "pass the path of a dskd TOML file")], source=str(path))
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            [ConfigProblem(str(path), f"not valid TOML ({exc})", "fix the syntax at that line")], source=str(path)
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            [ConfigProblem(str(path), f"cannot be read ({exc})", "check the path and its permissions")],
            source=str(path),
        ) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> list[ConfigProblem]:
    """Apply `table.key=value` overrides (TOML values; bare words are strings) to the raw tables."""
    problems = []
    tables = _tables()
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        table, dot, name = key.partition(".")
        if not sep or not dot or not name:
            problems.append(
                ConfigProblem(f"--set {item}", "expected table.key=value", "for example --set train.lr=3e-4")
            )
            continue
        if table not in tables and table != "teachers":
            problems.append(ConfigProblem(f"--set {key}", f"unknown table {table!r}", _closest(table, list(tables))))
            continue
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        if table == "teachers":  # --set teachers.<name>.<key>=value
            problem = apply_teacher_override(raw, name, value)
            if problem is not None:
                problems.append(problem)
            continue
        section = raw.setdefault(table, {})
        if not isinstance(section, dict):  # `train = 3` in the file: report it instead of crashing on assignment
            problems.append(
                ConfigProblem(
                    table, f"must be a table, got {type(section).__name__}", f"write [{table}] with keys under it"
                )
            )
            continue
        section[name] = value
    return problems


def parse_config(
    raw: dict[str, Any], *, source: str = "config", base_dir: str | Path | None = None, registry: Any = None
) -> Config:
    """Build a `Config` from raw TOML tables, or raise one `ConfigError` listing every problem.

    With a `registry`, plugin names and their options are checked too (unknown names list the known ones).
    """
    problems: list[ConfigProblem] = []
    tables = _tables()
    built: dict[str, Any] = {}
    for table_name in raw:
        if table_name not in tables and table_name != "teachers":
            problems.append(ConfigProblem(table_name, "unknown table", _closest(table_name, list(tables))))
    for table_name, cls in tables.items():
        values = raw.get(table_name, {})
        if not isinstance(values, dict):
            problems.append(
                ConfigProblem(
                    table_name,
                    f"must be a table, got {type(values).__name__}",
                    f"write [{table_name}] with keys under it",
                )
            )
            continue
        built[table_name] = _build_table(table_name, cls, values, problems, base_dir)
    built["teachers"] = parse_teachers(raw, built, problems, base_dir)
    if problems:
        raise ConfigError(problems, source=source)
    config = Config(**built, source=source)
    problems.extend(check_values(config))
    if registry is not None:
        problems.extend(check_plugins(config, registry))
    if problems:
        raise ConfigError(problems, source=source)
    return config


def _build_table(
    table_name: str, cls: type, values: dict[str, Any], problems: list[ConfigProblem], base_dir: str | Path | None
) -> Any:
    hints = _hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.name != "options"]
    takes_options = "options" in hints
    kwargs: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{table_name}.{key}"
        if key not in known:
            if takes_options:
                options[key] = value  # checked against the plugin's signature once the registry is known
            else:
                problems.append(ConfigProblem(dotted, "unknown key", _closest(key, known)))
            continue
        ok, converted = _coerce(value, hints[key])
        if not ok:
            problems.append(
                ConfigProblem(
                    dotted,
                    f"expected {_type_name(hints[key])}, got {value!r}",
                    f"write {key} = <{_type_name(hints[key])}>",
                )
            )
            continue
        if (table_name, key) in PATH_FIELDS and converted and base_dir is not None:
            converted = _resolve_path(converted, base_dir, hub_id_ok=_hub_id_ok(table_name, key, converted))
        kwargs[key] = converted
    if takes_options:
        kwargs["options"] = options
    return cls(**kwargs)


def _hub_id_ok(table_name: str, key: str, value: str) -> bool:
    if table_name == "data" and key in (
        "train",
        "valid",
        "test",
    ):  # a split may name a hub dataset, but never when it has a data file's extension
        from dskd.data.sources import looks_like_hub_name

        return looks_like_hub_name(value)
    return (table_name, key) in HUB_FIELDS


def _resolve_path(value: str, base_dir: str | Path, *, hub_id_ok: bool) -> str:
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    candidate = Path(base_dir) / path
    # A hub id ("org/name") that is not a local path stays as it is; local paths are made absolute. Paths that
    # cannot be hub ids (run.output_dir = "runs/x", not created yet) must never stay relative to the cwd.
    if not hub_id_ok or candidate.exists() or value.startswith(".") or value.count("/") > 1:
        return str(candidate.resolve())
    return value  # "gpt2" or "org/name" with no such local folder: a hub id, resolved by transformers


def check_values(config: Config) -> list[ConfigProblem]:
    """Ranges and choices of the fixed fields (plugin options are checked by `check_plugins`)."""
    p: list[ConfigProblem] = []

    def need(cond: bool, key: str, problem: str, fix: str) -> None:
        if not cond:
            p.append(ConfigProblem(key, problem, fix))

    r, t, d, tr, o, e = config.run, config.teacher, config.data, config.train, config.objective, config.eval
    for stage in r.stages:
        need(stage in STAGES, "run.stages", f"unknown stage {stage!r}", f"use any of {', '.join(STAGES)}")
    need(bool(r.stages), "run.stages", "is empty, so the run would do nothing", 'use e.g. ["distill", "eval"]')
    need(bool(r.output_dir), "run.output_dir", "is empty", "set a run directory, e.g. runs/my-job")
    if r.output_dir:
        blocker = _file_in_the_way(Path(r.output_dir))
        need(
            blocker is None,
            "run.output_dir",
            f"{blocker} is a file, not a directory",
            "choose another run directory (--set run.output_dir=...)",
        )
    need(r.log_every >= 1, "run.log_every", f"must be >= 1, got {r.log_every}", "use e.g. 10")
    for table, m in (("student", config.student), ("teacher", t)):
        need(
            m.dtype in ("float32", "bfloat16", "auto"),
            f"{table}.dtype",
            f"unknown dtype {m.dtype!r}",
            'use "auto", "float32" or "bfloat16"',
        )
    for table, m in (("student", config.student), ("teacher", t)):
        need(
            not m.gguf_file or bool(m.model),
            f"{table}.gguf_file",
            "is set but model is empty",
            f"set {table}.model to the folder that holds {m.gguf_file}, or set {table}.model to the .gguf file itself",
        )
        gguf = gguf_path(m.model, m.gguf_file) if m.model else None
        need(
            gguf is None or gguf.is_file(),
            f"{table}.gguf_file" if m.gguf_file else f"{table}.model",
            f"GGUF file not found: {gguf}",
            "check the path (relative paths start at the config file's folder)",
        )
    # Only stages that build a student need one: a job of just teacher_sft trains the teacher alone.
    need(
        bool(config.student.model or config.student.config) or set(r.stages) <= {"teacher_sft"},
        "student",
        "neither model nor config is set",
        "set student.model (pretrained) or student.config (random init)",
    )
    need(
        t.wire_dtype in ("bfloat16", "float32"),
        "teacher.wire_dtype",
        f"unknown dtype {t.wire_dtype!r}",
        'use "bfloat16" or "float32"',
    )
    need(t.timeout_s > 0, "teacher.timeout_s", f"must be > 0, got {t.timeout_s}", "use e.g. 120")
    need(
        t.retry_timeout_s >= 0,
        "teacher.retry_timeout_s",
        f"must be >= 0, got {t.retry_timeout_s}",
        "use e.g. 300 (seconds), or 0 to give up at once",
    )
    for address in t.address:
        host, sep, port = address.rpartition(":")
        need(
            bool(sep and host and port.isdigit()),
            "teacher.address",
            f"{address!r} is not host:port",
            'write e.g. "127.0.0.1:50051"',
        )
    if "teacher_sft" in r.stages:
        need(
            config.teacher_sft.steps > 0,
            "teacher_sft.steps",
            "must be > 0 when the teacher_sft stage runs",
            "set steps or drop the stage",
        )
        sft = config.teacher_sft
        need(
            sft.warmup_steps <= sft.steps,
            "teacher_sft.warmup_steps",
            f"{sft.warmup_steps} is longer than the stage ({sft.steps} steps), so the learning rate never reaches its peak",
            f"use at most {sft.steps}",
        )
        need(
            not t.address,
            "run.stages",
            "teacher_sft needs an in-process teacher",
            "remove teacher.address or the teacher_sft stage",
        )
    need(
        bool(d.train) or "distill" not in r.stages,
        "data.train",
        "is empty",
        "point it at a data file, a save_to_disk folder or a hub dataset",
    )
    if not d.prompt_field:
        p.extend(_template_problems(d.template))
    need(d.max_length >= 8, "data.max_length", f"must be >= 8, got {d.max_length}", "use e.g. 512")
    need(
        0 < d.max_prompt_length < d.max_length,
        "data.max_prompt_length",
        f"must be in (0, max_length), got {d.max_prompt_length}",
        "use e.g. half of max_length",
    )
    for key in ("split", "valid_split", "test_split"):
        need(bool(getattr(d, key)), f"data.{key}", "is empty", 'name a split of the dataset, e.g. "train"')
    need(
        d.format in ("auto", "instruction", "prompt_completion", "conversation"),
        "data.format",
        f"unknown record shape {d.format!r}",
        'use "auto", "instruction", "prompt_completion" or "conversation"',
    )
    need(d.train_on in ("all", "last"), "data.train_on", f"unknown value {d.train_on!r}", 'use "all" or "last"')
    for role, model in (("teacher", t), ("student", config.student)):
        if model.chat_template:
            path = Path(model.chat_template)
            need(
                path.is_file(),
                f"{role}.chat_template",
                f"{model.chat_template}: no such file",
                "point it at a Jinja chat template file (.jinja)",
            )
    need(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}", "use 0 or more")
    need(tr.max_steps >= 1, "train.max_steps", f"must be >= 1, got {tr.max_steps}", "use e.g. 1000")
    need(tr.batch_size >= 1, "train.batch_size", f"must be >= 1, got {tr.batch_size}", "use e.g. 8")
    need(tr.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {tr.grad_accum}", "use e.g. 1")
    need(tr.lr > 0, "train.lr", f"must be > 0, got {tr.lr}", "use e.g. 5e-4")
    need(tr.projector_lr > 0, "train.projector_lr", f"must be > 0, got {tr.projector_lr}", "use e.g. 1e-3")
    need(tr.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {tr.weight_decay}", "use e.g. 0.01")
    need(tr.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {tr.warmup_steps}", "use 0 or more")
    if "distill" in r.stages:
        need(
            tr.warmup_steps <= tr.max_steps,
            "train.warmup_steps",
            f"{tr.warmup_steps} is longer than the run (train.max_steps {tr.max_steps}), so the learning rate never reaches its peak",
            f"use at most {tr.max_steps}",
        )
    need(
        tr.schedule in ("cosine", "linear", "constant"),
        "train.schedule",
        f"unknown schedule {tr.schedule!r}",
        'use "cosine", "linear" or "constant"',
    )
    need(0 <= tr.min_lr_ratio <= 1, "train.min_lr_ratio", f"must be in [0, 1], got {tr.min_lr_ratio}", "use e.g. 0.1")
    need(tr.clip_grad >= 0, "train.clip_grad", f"must be >= 0, got {tr.clip_grad}", "use 1.0, or 0 to disable")
    need(
        tr.precision in ("fp32", "bf16"),
        "train.precision",
        f"unknown precision {tr.precision!r}",
        'use "fp32" or "bf16"',
    )
    need(
        tr.save_every >= 0,
        "train.save_every",
        f"must be >= 0, got {tr.save_every}",
        "use 0 (by time only) or a step interval",
    )
    need(
        tr.save_every_minutes >= 0,
        "train.save_every_minutes",
        f"must be >= 0, got {tr.save_every_minutes}",
        "use e.g. 10, or 0 to save by steps only",
    )
    need(tr.keep_checkpoints >= 1, "train.keep_checkpoints", f"must be >= 1, got {tr.keep_checkpoints}", "use e.g. 2")
    need(tr.max_bad_steps >= 1, "train.max_bad_steps", f"must be >= 1, got {tr.max_bad_steps}", "use e.g. 3")
    need(tr.chunk_size >= 0, "train.chunk_size", f"must be >= 0, got {tr.chunk_size}", "use 0 (automatic) or e.g. 256")
    need(0 <= o.kd_rate <= 1, "objective.kd_rate", f"must be in [0, 1], got {o.kd_rate}", "use e.g. 0.5")
    need(
        tr.sharding in SHARDINGS,
        "train.sharding",
        f"unknown sharding {tr.sharding!r}"
        + (
            " (DeepSpeed is not supported)"
            if "deepspeed" in tr.sharding.lower() or "zero" in tr.sharding.lower()
            else ""
        ),
        'use "none" or "fsdp" (FSDP2 shards weights, gradients and optimizer state like ZeRO-3)',
    )
    p.extend(lora_problems(config.student))
    need(o.temperature > 0, "objective.temperature", f"must be > 0, got {o.temperature}", "use e.g. 1.0 or 2.0")
    need(e.split in ("test", "valid"), "eval.split", f"unknown split {e.split!r}", 'use "test" or "valid"')
    need(e.max_new_tokens >= 1, "eval.max_new_tokens", f"must be >= 1, got {e.max_new_tokens}", "use e.g. 64")
    need(e.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {e.batch_size}", "use e.g. 32")
    need(e.temperature >= 0, "eval.temperature", f"must be >= 0, got {e.temperature}", "use 0 for greedy")
    need(0 < e.top_p <= 1, "eval.top_p", f"must be in (0, 1], got {e.top_p}", "use e.g. 1.0")
    need(len(e.seeds) >= 1, "eval.seeds", "is empty", "use e.g. [0]")
    need(e.max_samples >= 0, "eval.max_samples", f"must be >= 0, got {e.max_samples}", "use 0 for all")
    if "eval" in r.stages and e.split in ("test", "valid"):  # an unknown split is reported once, above
        split_file = d.test if e.split == "test" else d.valid
        need(
            bool(split_file),
            f"data.{e.split}",
            "is empty but the eval stage needs it",
            f"set data.{e.split} or drop the eval stage",
        )
    for table, key in sorted(PATH_FIELDS):
        value = getattr(getattr(config, table), key)
        if key in ("train", "valid", "test", "tls_ca_file", "config") and value:
            need(
                Path(value).exists() or _hub_id_ok(table, key, value),
                f"{table}.{key}",
                f"file not found: {value}",
                "check the path (relative paths start at the config file's folder)",
            )
        if key in ("train", "valid", "test") and value and Path(value).exists():
            # A folder or a pipe would be opened by the data loader and fail there, after the models load.
            from dskd.data.sources import SUPPORTED, holds_a_dataset

            path = Path(value)
            if path.is_dir():
                need(
                    holds_a_dataset(path),
                    f"{table}.{key}",
                    f"{value} is a directory with no dataset in it",
                    f"point it at {SUPPORTED}",
                )
            else:
                need(
                    path.is_file(),
                    f"{table}.{key}",
                    f"{value} is not a regular file (a pipe, socket or device)",
                    "point it at a JSONL file or another data file",
                )
    from dskd.store.checks import store_value_problems  # local: the store package imports this module

    p.extend(store_value_problems(config))
    p.extend(teachers_value_problems(config))
    return p


# `{word}` in a custom template: only these two are substituted; any other would reach the model verbatim.
TEMPLATE_FIELDS = ("instruction", "context")
_TEMPLATE_WORD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _template_problems(template: str) -> list[ConfigProblem]:
    if template == "alpaca":
        return []
    out = []
    unknown = sorted({name for name in _TEMPLATE_WORD.findall(template) if name not in TEMPLATE_FIELDS})
    if unknown:
        out.append(
            ConfigProblem(
                "data.template",
                f"unknown placeholder {', '.join('{' + n + '}' for n in unknown)}",
                'use only {instruction} and {context}, or "alpaca"',
            )
        )
    if "{instruction}" not in template:
        out.append(
            ConfigProblem(
                "data.template", "has no {instruction}", 'use "alpaca" or a string with {instruction} (and {context})'
            )
        )
    return out


def _file_in_the_way(path: Path) -> Path | None:
    """The path itself or the nearest existing folder above it, when that is a file (mkdir would fail)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def check_plugins(config: Config, registry: Any) -> list[ConfigProblem]:
    """Plugin names exist and their options are ones the plugin declares, with the right types."""
    from dskd.registry import option_defaults  # local: the registry is optional for plain parsing

    problems: list[ConfigProblem] = []
    objective = registry.family("objectives").get(config.objective.name)
    t = config.teacher
    # An objective declares whether it needs a teacher (sft does not); the name is never special-cased here.
    if (
        objective is not None
        and not config.teachers  # each entry is checked by itself (`dskd.config_teachers`)
        and registry.declared("objectives", config.objective.name, "needs_teacher")
        and not (t.model or t.config or t.address or t.store)
    ):
        problems.append(
            ConfigProblem(
                "teacher",
                "no teacher: neither model, config, address nor store is set",
                f"set teacher.model, teacher.config, teacher.address or teacher.store (objective {config.objective.name!r} needs one)",
            )
        )
    from dskd.store.checks import store_plugin_problems  # local: the store package imports this module

    problems.extend(store_plugin_problems(config, registry))
    for table, family in PLUGIN_TABLES.items():
        section = getattr(config, table)
        if not section.name:
            continue  # an empty aligner name means "choose for the vocabularies"
        known = registry.family(family)
        if section.name not in known:
            problems.append(
                ConfigProblem(
                    f"{table}.name", f"unknown {table} {section.name!r}", f"known: {', '.join(sorted(known)) or 'none'}"
                )
            )
            continue
        skip = ("temperature",) if table == "divergence" else ()
        defaults = option_defaults(known[section.name], skip=skip)
        for key, value in section.options.items():
            if key not in defaults:
                hint = _closest(key, list(defaults)) if defaults else f"{section.name!r} takes no options"
                if table == "divergence" and key == "temperature":
                    hint = "the temperature is set once for the objective: write it as objective.temperature"
                problems.append(ConfigProblem(f"{table}.{key}", f"unknown option of {table} {section.name!r}", hint))
                continue
            default = defaults[key]
            if default is not None:
                tp: Any = type(default)
                if isinstance(default, tuple):  # a list option: its items must have the type of the default's
                    tp = tuple[type(default[0]), ...] if default else tuple[str, ...]
                ok, _ = _coerce(value, tp)
                if not ok:
                    problems.append(
                        ConfigProblem(
                            f"{table}.{key}", f"expected {_type_name(tp)}, got {value!r}", f"the default is {default!r}"
                        )
                    )
                    continue
            # A plugin may declare closed ranges of numeric options: `fn.option_ranges = {"lam": (0.0, 1.0)}`.
            bounds = registry.declared(family, section.name, "option_ranges").get(key)
            if bounds is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
                low, high = bounds
                if not ((low is None or value >= low) and (high is None or value <= high)):
                    problems.append(
                        ConfigProblem(
                            f"{table}.{key}",
                            f"{value} is outside [{low}, {high}], the range {table} {section.name!r} declares",
                            f"use a value in [{low}, {high}]",
                        )
                    )
    problems.extend(teachers_plugin_problems(config, registry))
    return problems


def load_config(path: str | Path, overrides: list[str] | None = None, *, registry: Any = None) -> Config:
    """Read, override and validate a config file; raise one `ConfigError` with every problem found."""
    path = Path(path)
    raw = read_toml(path)
    problems = apply_overrides(raw, list(overrides or []))
    if problems:
        raise ConfigError(problems, source=str(path))
    return parse_config(raw, source=str(path), base_dir=path.resolve().parent, registry=registry)


def plugin_options(section: PluginConfig | ObjectiveConfig, factory: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The options to call a plugin with: its defaults overridden by the config, converted to their types."""
    from dskd.registry import option_defaults

    merged = option_defaults(factory, skip=skip)
    for key, value in section.options.items():
        default = merged.get(key)
        if isinstance(default, float) and isinstance(value, int):
            value = float(value)
        if isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        merged[key] = value
    return merged
