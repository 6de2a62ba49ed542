"""Reading a plugin's optional members: the contract's default when the plugin does not provide one.

A plugin object need not subclass its contract (`Objective`, `Aligner`, `Policy`, `Teacher`); the engine asks
for an optional member through `member`, which only knows the names the contract declares, so a misspelt or
undeclared name fails loudly here instead of silently reading nothing.
"""

from __future__ import annotations

from typing import Any

_MISSING = object()


def member(obj: Any, contract: type, name: str) -> Any:
    """`obj.<name>`, or `contract`'s default for it (bound to `obj` when it is a method)."""
    default = getattr(contract, name, _MISSING)
    if default is _MISSING:
        raise AttributeError(f"{contract.__name__} declares no member {name!r}")
    value = getattr(obj, name, _MISSING)
    if value is not _MISSING:
        return value
    if isinstance(default, property):
        return default.fget(obj)
    return default.__get__(obj, type(obj)) if callable(default) else default
