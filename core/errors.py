"""User-facing errors.

Every error a user can cause is a `DskdError`: the CLI prints its message as one line on stderr and exits
with status 2 (the traceback only with `--debug`). Messages read as "what went wrong -> where -> what to do".
"""

from __future__ import annotations

from dataclasses import dataclass


class DskdError(Exception):
    """An error caused by input the user controls (config, files, models, servers)."""


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in a config file: the dotted key, what is wrong, and how to fix it."""

    key: str
    problem: str
    fix: str = ""

    def __str__(self) -> str:
        text = f"{self.key}: {self.problem}" if self.key else self.problem
        return f"{text}; {self.fix}" if self.fix else text


class ConfigError(DskdError):
    """All the problems found in one config, reported together."""

    def __init__(self, problems: list[ConfigProblem], source: str = "config") -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__(self._summary())

    def _summary(self) -> str:
        if len(self.problems) == 1:
            return f"{self.source}: {self.problems[0]}"
        listed = " | ".join(str(p) for p in self.problems)
        return f"{self.source}: {len(self.problems)} problems: {listed}"


class PluginError(DskdError):
    """A plugin failed to load, registered a duplicate name, or cannot be used as configured."""


class DataError(DskdError):
    """A data file is missing, empty or malformed, or a sample cannot be tokenised as configured."""


class DataExhausted(DataError):
    """A streamed training split ended before `train.max_steps`; the engine checkpoints, then reports it."""


class ModelError(DskdError):
    """A model, tokenizer or LM head cannot be loaded or is incompatible with the objective."""


class TeacherError(DskdError):
    """A teacher could not answer. Names the address and a hint; never silently replaced by zeros."""


class StoreError(TeacherError):
    """A teacher store is missing, damaged, unfinished or does not fit the job (teacher, data, lengths, mode)."""


class CheckpointError(DskdError):
    """A checkpoint is missing, partial or was written for a different run."""


class DivergenceError(PluginError, ValueError):
    """A divergence got an out-of-range option or an input it cannot take (also a `ValueError`, so plain
    Python callers of the public divergence functions can catch it the usual way)."""
