"""Meta-tests: the built-in plugin modules, the entry points in `pyproject.toml` and the plugin docs agree.

A plugin module that is not listed never loads (and its tests still pass when they import it directly); a
listed module that registers another name makes `dskd plugins` disagree with the entry point. Both are
caught here from the files themselves, not from the installed metadata, which is only refreshed by
`pip install -e .`.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest
import tomllib

from dskd import hookspecs
from dskd.registry import FAMILIES, load_registry

REPO = Path(__file__).resolve().parents[1]
PLUGINS = REPO / "plugins"


def declared_entry_points() -> dict[str, str]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    return dict(pyproject["project"]["entry-points"]["dskd"])


def plugin_modules() -> dict[str, str]:
    """File stem -> import path, for every public module under plugins/<family>/."""
    found = {}
    for family in FAMILIES:
        for path in sorted((PLUGINS / family).glob("*.py")):
            if path.name == "__init__.py" or path.name.startswith("_"):
                continue
            found[path.stem] = f"dskd.plugins.{family}.{path.stem}"
    return found


def test_every_plugin_module_is_an_entry_point_and_every_entry_point_a_plugin_module():
    declared = declared_entry_points()
    modules = plugin_modules()
    unlisted = {stem: path for stem, path in modules.items() if declared.get(stem) != path}
    assert not unlisted, (
        f'plugin modules without an entry point in pyproject.toml: {unlisted}; add `name = "module"` lines '
        "under [project.entry-points.dskd] (a helper module that is no plugin must be named _*.py)"
    )
    builtin = {name: value for name, value in declared.items() if value.startswith("dskd.plugins.")}
    stale = {name: value for name, value in builtin.items() if modules.get(name) != value}
    assert not stale, f"entry points naming no module plugins/<family>/<name>.py: {stale}"


def test_every_entry_point_names_a_dskd_module():
    # Third-party plugins belong in their own distributions, not in dskd's pyproject.
    assert all(value.startswith("dskd.plugins.") for value in declared_entry_points().values())


@pytest.mark.parametrize(("name", "value"), sorted(declared_entry_points().items()))
def test_entry_point_module_registers_its_own_name_in_its_family(name, value):
    family = value.split(".")[2]
    assert family in FAMILIES, f"{value} is not under plugins/<family>/"
    module = importlib.import_module(value)
    registry = load_registry(extra_plugins=[module], entry_points=False)
    assert name in registry.family(family), f"{value} does not register {name!r} as one of its {family}"
    others = {f: sorted(registry.family(f)) for f in FAMILIES if f != family and registry.family(f)}
    assert not others, f"{value} registers in other families too: {others} (one plugin per file)"


def hookspec_names() -> list[str]:
    return sorted(
        name
        for name, obj in vars(hookspecs).items()
        if inspect.isfunction(obj) and hasattr(obj, f"{hookspecs.PROJECT}_spec")
    )


def test_hookspecs_are_the_four_families():
    assert hookspec_names() == sorted(f"dskd_register_{family}" for family in FAMILIES)


@pytest.mark.parametrize("hook", hookspec_names())
def test_every_hookspec_is_documented_in_the_plugin_guide(hook):
    text = (REPO / "docs" / "plugins.md").read_text(encoding="utf-8")
    assert re.search(rf"^### {hook}$", text, flags=re.MULTILINE), f"docs/plugins.md has no '### {hook}' section"
    parameters = ", ".join(inspect.signature(getattr(hookspecs, hook)).parameters)
    assert f"`{hook}({parameters})`" in text, f"docs/plugins.md does not give the signature {hook}({parameters})"
