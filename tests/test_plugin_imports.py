"""Plugins use dskd's public surface only, and the retired weighting vocabulary stays out of them.

A plugin, built-in or third-party, imports `dskd` and `dskd.kit` (docs/plugins.md); a built-in may also import
its own package (`dskd.plugins.*`, e.g. a private helper module). Since objectives return unweighted parts and
the engine weights them, no plugin speaks of a denominator or of split-step scales.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"
FILES = sorted(PLUGINS.rglob("*.py"))
ALLOWED = ("dskd", "dskd.kit")
TEXT_FILES = sorted(p for p in PLUGINS.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
RETIRED = re.compile(r"denominator|ce_scale|kd_scale|mixing\(")


def dskd_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every absolute import of a `dskd` module (`import dskd.x`, `from dskd.x import y`)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "dskd"]
        elif (
            isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "dskd"
        ):
            found.append((node.lineno, node.module))
    return found


def allowed(module: str) -> bool:
    return module in ALLOWED or module == "dskd.plugins" or module.startswith("dskd.plugins.")


def test_there_are_plugins_to_check():
    assert len(FILES) > 20


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PLUGINS)))
def test_a_plugin_imports_only_dskd_the_kit_and_its_own_package(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = [
        f"{path.relative_to(PLUGINS.parent)}:{line}: {module}"
        for line, module in dskd_imports(tree)
        if not allowed(module)
    ]
    assert not bad, "plugins import only dskd, dskd.kit or dskd.plugins.*:\n" + "\n".join(bad)


def test_the_import_check_catches_private_modules():
    tree = ast.parse(
        "import dskd\nfrom dskd.kit import member\nfrom dskd.kit.weights import LossWeights\n"
        "import dskd.run.engine\nfrom dskd.plugins.aligners._edit_distance import dtw_path\nfrom . import x\n"
    )
    assert [m for _, m in dskd_imports(tree) if not allowed(m)] == ["dskd.kit.weights", "dskd.run.engine"]


def test_no_plugin_mentions_a_denominator_or_split_step_scales():
    hits = [
        f"{path.relative_to(PLUGINS.parent)}:{n}: {line.strip()}"
        for path in TEXT_FILES
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if RETIRED.search(line)
    ]
    assert not hits, "objectives return unweighted parts; the engine alone weights them:\n" + "\n".join(hits)


def test_every_kit_name_is_the_object_even_after_its_modules_were_imported_directly():
    """`dskd.kit` loads names lazily; a submodule imported by its own path first must not shadow an export."""
    import importlib
    import pkgutil
    import types

    import dskd.kit

    for module in pkgutil.iter_modules(dskd.kit.__path__):
        importlib.import_module(f"dskd.kit.{module.name}")
    shadowed = [name for name in dskd.kit.__all__ if isinstance(getattr(dskd.kit, name), types.ModuleType)]
    assert shadowed == []
