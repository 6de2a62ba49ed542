"""Console output through rich, printed by the main process only (a null object elsewhere)."""

from __future__ import annotations

import contextlib
import sys
from typing import Any

from rich.console import Console as RichConsole
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table


class Console:
    def __init__(self, enabled: bool = True, stderr: bool = False) -> None:
        self.enabled = enabled
        self.rich = RichConsole(stderr=stderr, highlight=False)
        self.err = RichConsole(stderr=True, highlight=False)

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.enabled:
            self.rich.print(*args, **kwargs)

    def warn(self, message: str) -> None:
        # One line whatever the width (a log reader greps for it), and literal: paths may hold `[...]`.
        if self.enabled:
            self.err.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True)

    def table(self, title: str, columns: list[str], rows: list[list[Any]]) -> None:
        table = Table(title=title)
        for column in columns:
            table.add_column(column, justify="left" if column == columns[0] else "right")
        for row in rows:
            table.add_row(*[f"{v:.2f}" if isinstance(v, float) else str(v) for v in row])
        self.print(table)

    @contextlib.contextmanager
    def progress(self, name: str, total: int, start: int = 0):
        """A progress bar with loss, tokens/s and ETA; on a non-terminal it prints a line per update instead."""
        if not self.enabled:
            yield _NullProgress()
            return
        if not self.rich.is_terminal:
            yield _LineProgress(self, name, total)
            return
        bar = Progress(
            TextColumn(f"[bold]{name}[/bold]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.rich,
        )
        with bar:
            task = bar.add_task(name, total=total, completed=start, loss="-", tps="-")
            yield _BarProgress(bar, task)


class _NullProgress:
    def update(self, step: int, metrics: dict[str, float]) -> None:
        pass


class _BarProgress:
    def __init__(self, bar: Progress, task: Any) -> None:
        self.bar, self.task = bar, task

    def update(self, step: int, metrics: dict[str, float]) -> None:
        self.bar.update(
            self.task,
            completed=step,
            loss=f"{metrics.get('train/loss', float('nan')):.4f}",
            tps=f"{metrics.get('perf/tokens_per_s', 0):.0f}",
        )


class _LineProgress:
    def __init__(self, console: Console, name: str, total: int) -> None:
        self.console, self.name, self.total = console, name, total

    def update(self, step: int, metrics: dict[str, float]) -> None:
        self.console.print(
            f"{self.name} step {step}/{self.total} loss {metrics.get('train/loss', float('nan')):.4f} "
            f"{metrics.get('perf/tokens_per_s', 0):.0f} tok/s"
        )


def error_line(message: str) -> None:
    print(f"dskd: error: {message}", file=sys.stderr)
