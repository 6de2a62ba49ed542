"""What `dskd validate` (and every run) checks about `[teacher] store` before anything loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dskd.errors import ConfigProblem, StoreError


def _manifest(config) -> tuple[dict | None, ConfigProblem | None]:
    from dskd.store.teacher import read_manifest

    try:
        return read_manifest(Path(config.teacher.store)), None
    except StoreError as exc:
        return None, ConfigProblem("teacher.store", str(exc))


def store_value_problems(config) -> list[ConfigProblem]:
    """The store exists and is finished; the job's stages and splits are ones it can serve."""
    if not config.teacher.store:
        return []
    from dskd.store.build import held_out_split

    manifest, problem = _manifest(config)
    problems = [problem] if problem else []
    if "teacher_sft" in config.run.stages:
        problems.append(
            ConfigProblem(
                "run.stages",
                "teacher_sft trains a live teacher, but teacher.store serves a stored one",
                "drop the teacher_sft stage (train the teacher and build the store from it first)",
            )
        )
    held_out = held_out_split(config)
    if manifest is not None and "eval" in config.run.stages and held_out and held_out not in manifest["splits"]:
        problems.append(
            ConfigProblem(
                "teacher.store",
                f"holds the splits {', '.join(manifest['splits'])}, but the eval stage measures teacher agreement on data.{held_out}",
                f"build the store from a job that sets data.{held_out}, or drop the eval stage",
            )
        )
    return problems


def store_plugin_problems(config, registry: Any) -> list[ConfigProblem]:
    """The objective declares the store's mode usable (`teacher_store_modes`), and the policy declares that a store
    can serve it (`teacher_store`: its batches are the dataset's own sequences)."""
    if not config.teacher.store:
        return []
    manifest, _ = _manifest(config)  # a missing store is reported once, by store_value_problems
    problems = []
    objectives, policies = registry.family("objectives"), registry.family("policies")
    name = config.objective.name
    if manifest is not None and name in objectives and registry.declared("objectives", name, "needs_teacher"):
        modes = tuple(registry.declared("objectives", name, "teacher_store_modes"))
        if manifest["mode"] not in modes:
            problems.append(
                ConfigProblem(
                    "teacher.store",
                    f"holds mode {manifest['mode']!r}, but objective {name!r} can use a store of mode {' or '.join(map(repr, modes)) or 'none'}",
                    f"build a store with --mode {modes[0]}" if modes else "use the live teacher",
                )
            )
    policy = config.policy.name or _default_policy(registry)
    if policy in policies and not registry.declared("policies", policy, "teacher_store"):
        problems.append(
            ConfigProblem(
                "policy.name",
                f"policy {policy!r} needs the live teacher (it distils on sequences the store does not hold: student or teacher samples)",
                "use policy off_policy with a teacher store, or unset teacher.store",
            )
        )
    return problems


def _default_policy(registry: Any) -> str:
    try:
        return registry.default("policies")
    except Exception:  # no unique default: reported by the run's own checks
        return ""
