"""Prints the hostile-input table at the end of the session, whatever `-s` says (CI logs show it)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The runner uses the shared helpers of tests/ (tiny_job, teacher_server_harness), also when run on its own.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TABLE = pytest.StashKey[list]()


@pytest.fixture(scope="session")
def hostile_table(request) -> list:
    """Rows (case, input, status, first line, verdict) that the runner fills and the summary prints."""
    return request.config.stash.setdefault(TABLE, [])


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    rows = config.stash.get(TABLE, [])
    if not rows:
        return
    terminalreporter.section("hostile inputs")
    headers = ("case", "input", "status", "first line", "verdict")
    cells = [headers, *[tuple(_clip(str(c), w) for c, w in zip(row, (34, 44, 18, 110, 60))) for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        terminalreporter.write_line("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if index == 0:
            terminalreporter.write_line("  ".join("-" * w for w in widths))
    failed = sum(1 for row in rows if row[-1] != "ok")
    terminalreporter.write_line(f"{len(rows)} hostile inputs, {len(rows) - failed} answered as expected, {failed} not")


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
