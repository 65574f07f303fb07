"""Terminal output: the one object that writes (tables and notes, JSON with ``--json``, nothing with ``--quiet``)
and the small formatters the commands share."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
from rich.console import Console, Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text


class Output:
    """All terminal output of one command: results to stdout (a table, or JSON with ``--json``), notes,
    progress and errors to stderr. ``--quiet`` keeps only JSON and errors."""

    def __init__(self, json_mode: bool = False, quiet: bool = False) -> None:
        self.json_mode = json_mode
        self.quiet = quiet
        self.out = Console(highlight=False)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)

    @property
    def interactive(self) -> bool:
        return not self.quiet and self.err.is_terminal

    def note(self, msg: str | Text, style: str = "") -> None:
        """A line for the user on stderr (never markup: library messages may hold brackets)."""
        if not self.quiet:
            self.err.print(msg if isinstance(msg, Text) else Text(msg, style=style))

    def warn(self, msg: str) -> None:
        if not self.quiet:
            self.err.print(Text.assemble(("warning: ", "bold yellow"), (msg, "yellow")))

    def show(self, *renderables: Any) -> None:
        """A result for humans (tables): shown unless ``--json`` or ``--quiet``."""
        if not self.json_mode and not self.quiet:
            for r in renderables:
                self.out.print(r)

    def emit(self, data: Any) -> None:
        """The machine-readable result: printed only with ``--json``, as plain JSON on stdout."""
        if self.json_mode:
            typer.echo(json.dumps(data, indent=2, default=_json_default))

    @contextlib.contextmanager
    def status(self, msg: str) -> Iterator[Any]:
        """A spinner on stderr while something runs (only on a terminal); yields ``update(msg)``."""
        if not self.interactive:
            yield lambda _msg: None
            return
        with self.err.status(msg) as st:
            yield lambda m: st.update(m)

    def progress(self) -> Progress:
        return Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=self.err, transient=True, disable=not self.interactive,
        )


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    if isinstance(o, float) and o != o:  # pragma: no cover
        return None
    return str(o)




def titled(title: str, table: Any, caption: str | None = None) -> Group:
    """A table with its title above and caption below as plain lines (a table title would wrap to the
    table's own width)."""
    parts = [Text(title, style="bold"), table]
    if caption:
        parts.append(Text(caption, style="dim"))
    return Group(*parts)


def size_text(size: Any) -> str:
    return "-" if not size else f"{size[0]}x{size[1]}"


def fmt_diff(d: float) -> str:
    return "0" if d == 0 else f"{d:.2e}"
