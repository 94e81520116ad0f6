"""Progress bars for long loops (layers quantized, tokens evaluated), silenced by --quiet/--json."""

from __future__ import annotations

import contextlib
import sys

QUIET = False


def set_quiet(quiet: bool) -> None:
    global QUIET
    QUIET = quiet


@contextlib.contextmanager
def progress(description: str, total: int | None, unit: str = ""):
    """Yields ``advance(n=1, **fields)``; renders a rich bar (elapsed time and ETA) on stderr unless quiet."""
    if QUIET:
        yield lambda n=1, **kw: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*cols, console=Console(file=sys.stderr), transient=False) as bar:
        task = bar.add_task(description, total=total, info="")
        yield lambda n=1, info="": bar.update(task, advance=n, info=info)


def log(msg: str) -> None:
    if not QUIET:
        from rich.console import Console

        Console(file=sys.stderr).print(msg)
