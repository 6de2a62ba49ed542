"""dskd: Dual-Space Knowledge Distillation for language models.

Public API for plugin authors and users:

- `dskd.hookimpl`: the marker for plugin hook implementations (see `dskd.hookspecs`).
- `dskd.load_registry()`: every loaded plugin's divergences, aligners, policies and objectives by name.
- `dskd.Alignment`, `dskd.Batch`, `dskd.TeacherSignal`, `dskd.SparseTeacher`, `dskd.LossTerms`: the values that
  pass between stages.
"""

from dskd.errors import DskdError
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
    "SignalRequest",
    "SparseTeacher",
    "TeacherSignal",
    "hookimpl",
    "load_registry",
    "__version__",
]
