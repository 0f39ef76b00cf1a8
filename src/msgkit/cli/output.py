"""What the CLI prints: rich on a terminal when rich is installed, plain text otherwise, JSON for scripts.

Results go to ``out``; errors, notes and progress go to ``err``, so ``--json`` output stays
machine-readable. rich is imported lazily (the ``cli`` extra), never by ``import msgkit``.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import IO, Any, TextIO

#: Called with (done, total or None) as long work goes on.
ProgressFn = Callable[[int, int | None], None]


def _rich_console(stream: TextIO) -> Any:
    """A rich Console writing to ``stream`` when it is a terminal and rich is installed, else None."""
    if not stream.isatty():
        return None
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console(file=stream, highlight=False)


def plain_progress(verb: str, err: TextIO) -> ProgressFn | None:
    """A progress line on a terminal (a bar when the total is known, else a running count), else None."""
    if not err.isatty():
        return None
    started = time.monotonic()

    def show(done: int, total: int | None) -> None:
        rate = done / max(time.monotonic() - started, 1e-6)
        if total:
            filled = int(30 * min(done / total, 1.0))
            line = f"{verb} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} ({rate:,.0f}/s)"
        else:
            line = f"{verb} {done} ({rate:,.0f}/s)"
        print(f"\r{line}", end="", file=err, flush=True)

    return show


def decode_body(body: bytes) -> tuple[str, Any]:
    """``(format, value)`` for showing a body: ``json`` (the parsed value), ``text``, or ``base64``."""
    try:
        text = body.decode()
    except UnicodeDecodeError:
        return "base64", base64.b64encode(body).decode()
    try:
        return "json", json.loads(text)
    except ValueError:
        pass
    if any(ch < " " and ch not in "\t\r\n" for ch in text):
        return "base64", base64.b64encode(body).decode()
    return "text", text


class Ui:
    """The CLI's output: ``out`` for results, ``err`` for everything else; rich only on a terminal."""

    def __init__(self, out: TextIO, err: TextIO, stdin: IO[Any], *, as_json: bool = False) -> None:
        self.out = out
        self.err = err
        self.stdin = stdin
        self.as_json = as_json
        self.console = None if as_json else _rich_console(out)

    def json(self, data: object, *, one_line: bool = False) -> None:
        """Print ``data`` as JSON on ``out`` (one line for streams of records, else indented)."""
        print(json.dumps(data, indent=None if one_line else 2, ensure_ascii=False), file=self.out, flush=one_line)

    def say(self, text: str) -> None:
        """A line of human output on ``out``."""
        if self.console is not None:
            self.console.print(text, markup=False)
        else:
            print(text, file=self.out)

    def note(self, text: str) -> None:
        """A line for the person running the command (on ``err``, so ``out`` stays clean)."""
        print(text, file=self.err)

    def table(self, columns: Sequence[str], rows: Sequence[Sequence[str]], *, title: str | None = None) -> None:
        """Rows under column headings: a rich table on a terminal, aligned plain text otherwise."""
        if self.console is not None:
            from rich.table import Table

            table = Table(*columns, title=title)
            for row in rows:
                table.add_row(*row)
            self.console.print(table)
            return
        if title:
            print(title, file=self.out)
        all_rows = [tuple(columns), *(tuple(r) for r in rows)]
        widths = [max(len(r[c]) for r in all_rows) for c in range(len(columns) - 1)]
        for r in all_rows:
            print("  ".join([*(r[c].ljust(widths[c]) for c in range(len(widths))), r[-1]]).rstrip(), file=self.out)

    def fields(self, values: Mapping[str, object]) -> None:
        """``name: value`` lines."""
        width = max((len(k) for k in values), default=0)
        for name, value in values.items():
            self.say(f"{name.ljust(width)}  {value}")

    def body(self, body: bytes) -> None:
        """A message body for reading: JSON indented (highlighted on a terminal), text, else base64."""
        kind, value = decode_body(body)
        if kind == "json":
            text = json.dumps(value, indent=2, ensure_ascii=False)
            if self.console is not None:
                from rich.syntax import Syntax

                self.console.print(Syntax(text, "json", background_color="default"))
                return
            print(text, file=self.out)
        elif kind == "text":
            self.say(value)
        else:
            self.say(f"(binary, {len(body)} bytes, base64) {value}")

    def rule(self, title: str) -> None:
        """A separator line with ``title``, between records."""
        if self.console is not None:
            self.console.rule(title, align="left")
        else:
            print(f"--- {title}", file=self.out)

    @contextmanager
    def progress(self, verb: str, total: int | None = None) -> Iterator[ProgressFn | None]:
        """A progress bar on ``err`` when it is a terminal (rich's when installed); None elsewhere."""
        console = _rich_console(self.err)
        if console is None:
            show = plain_progress(verb, self.err)
            try:
                yield show
            finally:
                if show is not None:
                    print(file=self.err)
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task(verb, total=total)

            def update(done: int, new_total: int | None) -> None:
                bar.update(task, completed=done, total=new_total if new_total is not None else total)

            yield update
