"""`tests/broken_plugins_src/dskd_broken_plugins`, a plugin package whose plugins break their contracts, seen by
dskd as the installed distribution `dskd-broken-plugins`, without touching the environment.

As in `test_plugin_example.py`: `PYTHONPATH` holds the package's source and a folder with a generated
`dskd_broken_plugins-0.1.0.dist-info/` (METADATA and the entry point of group `dskd`), all that
`importlib.metadata`, and so dskd's loader, looks at.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dskd.registry import LOAD_ENV

SOURCE = Path(__file__).resolve().parent / "broken_plugins_src"
PACKAGE = "dskd-broken-plugins"
PLUGIN = "dskd_broken_plugins"  # the entry point's name, which is the plugin's name in errors


def installed_env(site: Path) -> dict[str, str]:
    """An environment in which `python -m dskd` sees dskd-broken-plugins as installed; `site` is an empty folder."""
    info = site / "dskd_broken_plugins-0.1.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[dskd]\n{PLUGIN} = dskd_broken_plugins\n")
    env = {key: value for key, value in os.environ.items() if key != LOAD_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SOURCE), str(site), env.get("PYTHONPATH")]))
    return env


def run_dskd(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dskd", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """The lines of stderr dskd wrote as its error (progress bars of `datasets` aside)."""
    return [line for line in result.stderr.splitlines() if line.startswith("dskd: error")]
