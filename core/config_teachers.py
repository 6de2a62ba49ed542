"""`[[teachers]]`: several teachers in one job, each a whole `[teacher]` table plus a name, a weight, its own
aligner and an optional route (issue 18).

A job has either one `[teacher]` table or `[[teachers]]` entries. Every consumer (training, evaluation) reads the
teachers through `teacher_entries(config)`, which turns a single `[teacher]` into one entry named "teacher", so
code that handles a list of teachers never special-cases the single one.

Kept out of `dskd.config` (already long) and imported by it; it reuses that module's parsing helpers through
late imports, so the two never import each other at load time.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dskd.errors import ConfigProblem

SINGLE_NAME = "teacher"
"""The name of the one entry a `[teacher]` table stands for."""

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
ENTRY_KEYS = ("name", "weight", "aligner", "route")
"""Keys of a `[[teachers]]` entry besides those of `[teacher]`."""


@dataclass(frozen=True)
class TeacherEntry:
    """One teacher of a job: its `[teacher]` settings, its name, weight, aligner and route."""

    name: str = SINGLE_NAME
    """Unique name of the teacher ([A-Za-z0-9_-]+): names its metrics (`train/kd/<name>`), its projectors in checkpoints
    and its fine-tuned copy (`teachers/<name>/`). Required in a `[[teachers]]` entry."""
    weight: float = 1.0
    """Weight of this teacher's distillation loss; on each sample the weights of the teachers that serve it are
    normalised to sum to 1. Must be >= 0, and not all zero."""
    aligner: Any = None
    """This pair's aligner: a plugin name ("eta") or a table { name = "eta", ...options }. Default: the job's [aligner]
    table (so the same rules: none for the same vocabulary, else the objective's default or eta)."""
    route: dict = dataclasses.field(default_factory=dict)
    """Serve only samples whose field matches: one key, a sample field, with a value or a list of values (fnmatch globs),
    e.g. { category = ["arithmetic/*", "list/*"] }. Empty: every sample. Every other key of [teacher] applies too."""
    teacher: Any = None
    """The `TeacherConfig` of this entry (not a key: the entry's other keys)."""

    @property
    def route_field(self) -> str:
        return next(iter(self.route), "")

    @property
    def route_values(self) -> tuple[str, ...]:
        if not self.route:
            return ()
        value = self.route[self.route_field]
        return (value,) if isinstance(value, str) else tuple(value)

    def serves(self, tags: dict[str, str]) -> bool:
        """Whether this teacher serves a sample with these route-field values (`Example.tags`)."""
        if not self.route:
            return True
        value = tags.get(self.route_field)
        return value is not None and any(fnmatch.fnmatchcase(value, pattern) for pattern in self.route_values)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "weight": self.weight}
        teacher = dataclasses.asdict(self.teacher)
        out.update({k: list(v) if isinstance(v, tuple) else v for k, v in teacher.items()})
        out["aligner"] = {"name": self.aligner.name, **self.aligner.options}
        if self.route:
            out["route"] = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in self.route.items()}
        return out


def teacher_entries(config: Any) -> tuple[TeacherEntry, ...]:
    """The job's teachers: its `[[teachers]]` entries, or its one `[teacher]` as an entry named "teacher" (weight 1, no
    route, the job's aligner)."""
    if config.teachers:
        return tuple(config.teachers)
    return (TeacherEntry(name=SINGLE_NAME, weight=1.0, aligner=config.aligner, teacher=config.teacher),)


def route_fields(config: Any) -> tuple[str, ...]:
    """The sample fields the routes read (carried on each `Example` as its tags)."""
    return tuple(sorted({e.route_field for e in teacher_entries(config) if e.route}))


def entry_config(config: Any, entry: TeacherEntry) -> Any:
    """The job as if `entry` were its one `[teacher]` (with the entry's aligner): what the single-teacher builders
    (teacher, aligner, store checks) take."""
    return dataclasses.replace(config, teacher=entry.teacher, aligner=entry.aligner, teachers=())


# -- parsing ---------------------------------------------------------------------------------------------------
def parse_teachers(
    raw: dict[str, Any], built: dict[str, Any], problems: list[ConfigProblem], base_dir: Any
) -> tuple[TeacherEntry, ...]:
    """The `[[teachers]]` entries of raw TOML tables (`built` holds the other tables, parsed); problems are appended."""
    from dskd.config import AlignerConfig, TeacherConfig, _build_table

    entries = raw.get("teachers")
    if entries is None:
        return ()
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries) or not entries:
        problems.append(
            ConfigProblem(
                "teachers",
                "must be a list of tables",
                'write one [[teachers]] table per teacher, each with name = "..."',
            )
        )
        return ()
    if built.get("teacher", TeacherConfig()) != TeacherConfig():  # config.json writes a default [teacher] too
        problems.append(
            ConfigProblem(
                "teacher",
                "a job has either one [teacher] table or [[teachers]] entries, and this one has both",
                'move the [teacher] keys into a [[teachers]] entry (with name = "..."), or drop [[teachers]]',
            )
        )
    out = []
    for i, values in enumerate(entries):
        name = values.get("name")
        where = f"teachers.{name}" if isinstance(name, str) and name else f"teachers[{i}]"
        if not isinstance(name, str) or not _NAME.match(name):
            problems.append(
                ConfigProblem(
                    f"{where}.name",
                    "is missing" if name is None else f"{name!r} is not a name of letters, digits, '_' and '-'",
                    'give every [[teachers]] entry a name, e.g. name = "math"',
                )
            )
            name = f"teachers[{i}]"
        weight = values.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            problems.append(
                ConfigProblem(f"{where}.weight", f"expected a number, got {weight!r}", "write e.g. weight = 1.0")
            )
            weight = 1.0
        aligner = _entry_aligner(values.get("aligner"), built.get("aligner") or AlignerConfig(), where, problems)
        route = _entry_route(values.get("route", {}), where, problems)
        rest = {k: v for k, v in values.items() if k not in ENTRY_KEYS}
        found: list[ConfigProblem] = []
        teacher = _build_table(SINGLE_NAME, TeacherConfig, rest, found, base_dir)
        problems.extend(_renamed(p, where) for p in found)
        out.append(TeacherEntry(name=name, weight=float(weight), aligner=aligner, route=route, teacher=teacher))
    return tuple(out)


def _entry_aligner(value: Any, default: Any, where: str, problems: list[ConfigProblem]) -> Any:
    from dskd.config import AlignerConfig

    if value is None:
        return default
    if isinstance(value, str):
        return AlignerConfig(name=value)
    if isinstance(value, dict) and isinstance(value.get("name", ""), str):
        options = {k: v for k, v in value.items() if k != "name"}
        return AlignerConfig(name=value.get("name", ""), options=options)
    problems.append(
        ConfigProblem(
            f"{where}.aligner",
            f"expected a plugin name or a table, got {value!r}",
            'write aligner = "eta" or aligner = { name = "eta" }',
        )
    )
    return default


def _entry_route(value: Any, where: str, problems: list[ConfigProblem]) -> dict:
    fix = 'write route = { category = ["arithmetic/*"] }: one sample field and its value or values'
    if not isinstance(value, dict) or len(value) > 1:
        problems.append(ConfigProblem(f"{where}.route", f"must be a table with exactly one key, got {value!r}", fix))
        return {}
    for field, values in value.items():
        items = [values] if isinstance(values, str) else values
        if not isinstance(items, list) or not items or not all(isinstance(v, str) for v in items):
            problems.append(
                ConfigProblem(f"{where}.route.{field}", f"expected a string or a list of strings, got {values!r}", fix)
            )
            return {}
        return {field: values if isinstance(values, str) else tuple(values)}
    return {}


def _renamed(problem: ConfigProblem, where: str) -> ConfigProblem:
    """A problem found by the single-teacher checks, named for the entry (`teacher.x` -> `teachers.<name>.x`)."""
    key = problem.key
    if key == SINGLE_NAME or key.startswith(SINGLE_NAME + "."):
        key = where + key[len(SINGLE_NAME) :]
    elif key.startswith("aligner"):
        key = f"{where}.{key}"
    else:
        key = f"{where}: {key}"
    return ConfigProblem(key, problem.problem, problem.fix)


def apply_teacher_override(raw: dict[str, Any], key: str, value: Any) -> ConfigProblem | None:
    """`--set teachers.<name>.<key>=value` on the raw entries."""
    name, dot, field = key.partition(".")
    entries = raw.get("teachers")
    match = [e for e in entries if isinstance(e, dict) and e.get("name") == name] if isinstance(entries, list) else []
    if not dot or not field or not match:
        known = (
            ", ".join(str(e.get("name")) for e in entries if isinstance(e, dict)) if isinstance(entries, list) else ""
        )
        return ConfigProblem(
            f"--set teachers.{key}",
            "expected teachers.<name>.<key>=value naming a [[teachers]] entry",
            f"entries: {known}" if known else "the job has no [[teachers]] entries",
        )
    match[0][field] = value
    return None


# -- checks ----------------------------------------------------------------------------------------------------
def teachers_value_problems(config: Any) -> list[ConfigProblem]:
    """Names, weights and routes of the entries, and each entry's `[teacher]` checks, named for the entry."""
    from dskd.config import check_values

    entries = config.teachers
    if not entries:
        return []
    p: list[ConfigProblem] = []
    seen: set[str] = set()
    for entry in entries:
        where = f"teachers.{entry.name}"
        if entry.name in seen:
            p.append(
                ConfigProblem(
                    where, f"two [[teachers]] entries are named {entry.name!r}", "give each teacher its own name"
                )
            )
        seen.add(entry.name)
        if entry.weight < 0:
            p.append(ConfigProblem(f"{where}.weight", f"must be >= 0, got {entry.weight}", "use e.g. 1.0"))
        t = entry.teacher
        if not (t.model or t.config or t.address or t.store):
            p.append(
                ConfigProblem(
                    where, "no teacher: neither model, config, address nor store is set", "set one of them in the entry"
                )
            )
        # Only the entry's own keys: the job's other tables are checked once, and the stage checks of a single
        # teacher (teacher_sft needs it in-process) do not apply, since teacher_sft trains only the entries it can.
        own = [q for q in check_values(entry_config(config, entry)) if q.key.startswith(SINGLE_NAME + ".")]
        p.extend(_renamed(q, where) for q in own)
        p.extend(_length_problems(config, entry, where))
    if entries and all(e.weight <= 0 for e in entries) and not any(e.weight < 0 for e in entries):
        p.append(
            ConfigProblem(
                "teachers", "every weight is 0, so no teacher would teach", "give at least one teacher weight > 0"
            )
        )
    return p


def _length_problems(config: Any, entry: TeacherEntry, where: str) -> list[ConfigProblem]:
    """A teacher that cannot read samples of `data.max_length` tokens: a store built with another length, or a model
    whose positions end before it (one teacher's limit would otherwise fail mid-run, or silently differ)."""
    t, max_length = entry.teacher, config.data.max_length
    if t.store:
        try:
            manifest = json.loads((Path(t.store) / "manifest.json").read_text())
        except (OSError, ValueError):
            return []  # a missing or damaged store is reported by the store checks
        built = manifest.get("max_length")
        if built is not None and built != max_length:
            return [
                ConfigProblem(
                    f"{where}.store",
                    f"was built with data.max_length = {built}, but this job has {max_length}",
                    f"set data.max_length = {built}, or rebuild this teacher's store",
                )
            ]
        return []
    source = t.config or t.model
    path = Path(source) if source else None
    if path is not None and path.is_dir():
        path = path / "config.json"
    if path is None or not path.is_file():
        return []
    try:
        positions = json.loads(path.read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return []
    if isinstance(positions, int) and positions < max_length:
        return [
            ConfigProblem(
                where,
                f"the model reads at most {positions} tokens (max_position_embeddings), below data.max_length = {max_length}",
                f"lower data.max_length to {positions} or use another model for this teacher",
            )
        ]
    return []


def teachers_plugin_problems(config: Any, registry: Any) -> list[ConfigProblem]:
    """The objective and policy accept several teachers; each entry's aligner exists with valid options, and a store
    entry suits the objective and policy (the single-teacher plugin checks, per entry)."""
    from dskd.config import check_plugins

    entries = config.teachers
    if not entries:
        return []
    p: list[ConfigProblem] = []
    objective, policy = config.objective.name, config.policy.name or registry.default("policies")
    if objective in registry.family("objectives"):
        if not registry.declared("objectives", objective, "needs_teacher"):
            p.append(
                ConfigProblem(
                    "teachers",
                    f"objective {objective!r} uses no teacher, but the job lists {len(entries)} [[teachers]]",
                    "drop the [[teachers]] entries or choose a distillation objective",
                )
            )
        elif len(entries) > 1 and not registry.declared("objectives", objective, "multi_teacher"):
            p.append(
                ConfigProblem(
                    "objective.name",
                    f"objective {objective!r} supports one teacher only, but the job lists {len(entries)} [[teachers]]",
                    "keep one teacher or choose an objective that takes several (kd, dskd, dskd_v2, ...)",
                )
            )
    if (
        len(entries) > 1
        and policy in registry.family("policies")
        and not registry.declared("policies", policy, "multi_teacher")
    ):
        p.append(
            ConfigProblem(
                "policy.name",
                f"policy {policy!r} works with one teacher only, but the job lists {len(entries)} [[teachers]]",
                "use the off_policy policy with several teachers",
            )
        )
    for entry in entries:
        where = f"teachers.{entry.name}"
        own = [
            q
            for q in check_plugins(entry_config(config, entry), registry)
            if q.key.startswith(SINGLE_NAME + ".") or q.key.startswith("aligner")
        ]
        p.extend(_renamed(q, where) for q in own)
    return p
