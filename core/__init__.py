"""dskd: Dual-Space Knowledge Distillation for language models.

Public API for plugin authors and users:

- `dskd.hookimpl`: the marker for plugin hook implementations (see `dskd.hookspecs`).
- `dskd.load_registry()`: every loaded plugin's divergences, aligners, policies and objectives by name.
- `dskd.Alignment`, `dskd.Batch`, `dskd.TeacherSignal`, `dskd.SparseTeacher`, `dskd.LossTerms`: the values that
  pass between stages.
- `dskd.DskdError`, `dskd.PluginError`, `dskd.ModelError`: the errors a plugin raises for input it cannot serve
  (the CLI prints them as one line and exits with status 2).
- `dskd.kit`: the toolkit for plugin authors (losses, LM-head view, dual-space terms, token bytes, sampling).
"""

from dskd.errors import DskdError, ModelError, PluginError
from dskd.hookspecs import hookimpl
from dskd.registry import load_registry
from dskd.types import IGNORE_INDEX, Alignment, Batch, LossTerms, SignalRequest, SparseTeacher, TeacherSignal

__version__ = "0.1.0"

__all__ = [
    "IGNORE_INDEX",
    "Alignment",
    "Batch",
    "DskdError",
    "LossTerms",
    "ModelError",
    "PluginError",
    "SignalRequest",
    "SparseTeacher",
    "TeacherSignal",
    "hookimpl",
    "load_registry",
    "__version__",
]
