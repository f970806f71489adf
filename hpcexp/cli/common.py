"""What every subcommand shares: the context object, project loading and output helpers.

Output is for people on a terminal by default (aligned tables) and for scripts with
``--json`` (one JSON document on stdout, nothing else there).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import click

if TYPE_CHECKING:  # pragma: no cover
    from hpcexp.core.config import Project


@dataclass
class Ctx:
    """Carried by click from the group into every subcommand."""

    project_arg: str | None = None
    debug: bool = False
    _project: "Project | None" = None

    def project(self) -> "Project":
        """Load (once) and return the project; raises ConfigError/NotFound for the CLI edge."""
        if self._project is None:
            from hpcexp.core.config import load_project

            self._project = load_project(explicit=self.project_arg)
        return self._project


pass_ctx = click.make_pass_decorator(Ctx, ensure=True)

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")
arch_option = click.option("--arch", type=click.Choice(["amd64", "arm64"]), default=None,
                           help="Architecture (default: this machine's).")


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, paths and tuples into plain JSON types."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(to_jsonable(obj), indent=2, sort_keys=True, ensure_ascii=False))


def table(rows: Iterable[Sequence[Any]], headers: Sequence[str]) -> str:
    """Left-aligned columns, two spaces apart; an empty table says so."""
    body = [["" if c is None else str(c) for c in row] for row in rows]
    if not body:
        return "(none)"
    widths = [len(h) for h in headers]
    for row in body:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*headers).rstrip(), *(fmt.format(*row).rstrip() for row in body)]
    return "\n".join(lines)


def echo_table(rows: Iterable[Sequence[Any]], headers: Sequence[str]) -> None:
    click.echo(table(rows, headers))


def warn(message: str) -> None:
    click.echo(f"hpcexp: warning: {message}", err=True)


def info(message: str, quiet: bool = False) -> None:
    if not quiet:
        click.echo(message, err=True)


def is_tty() -> bool:
    return sys.stderr.isatty()


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(max(seconds, 0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


Printer = Callable[[Any], None]
