"""What every subcommand shares: the context object, project loading and output helpers.

Output is for people on a terminal by default (aligned tables) and for scripts with
``--json`` (one JSON document on stdout, nothing else there).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
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


# The presentation helpers live below both edges (the dashboard shows the same): JSON in
# hpcexp.infra.jsonable, sizes and ages in hpcexp.app.views. They are imported when
# called, not at module level: `hpcexp --help` imports this module and must import
# neither, and `list --json` must not import the application's views.

def to_jsonable(obj: Any) -> Any:
    """Dataclasses, paths and tuples into plain JSON types (:func:`hpcexp.infra.jsonable.to_jsonable`)."""
    from hpcexp.infra.jsonable import to_jsonable as convert

    return convert(obj)


def emit_json(obj: Any) -> None:
    """Indented JSON; a long list (``status SWEEP --json`` of thousands of runs, the runs
    of ``submit --json``) has one element a line instead: the same JSON, made by the C
    encoder (indenting runs in Python, several times slower)."""
    long = isinstance(obj, list) and len(obj) > LONG_LIST
    if isinstance(obj, dict) and any(isinstance(v, list) and len(v) > LONG_LIST for v in obj.values()):
        enc = json.JSONEncoder(sort_keys=True, ensure_ascii=False, default=_plain).encode
        keys = sorted(str(k) for k in obj)
        click.echo("{\n" + ",\n".join(f"{enc(k)}: {_long_list(obj[k], enc)}" for k in keys) + "\n}")
        return
    if long:
        enc = json.JSONEncoder(sort_keys=True, ensure_ascii=False, default=_plain).encode
        click.echo(_long_list(obj, enc))
        return
    click.echo(json.dumps(to_jsonable(obj), indent=2, sort_keys=True, ensure_ascii=False))


def _long_list(value: Any, enc: Any) -> str:
    if isinstance(value, list) and len(value) > LONG_LIST:
        # the encoder converts what plain JSON lacks as it meets it, without a first walk
        return "[\n" + ",\n".join(enc(item) for item in value) + "\n]"
    return str(enc(value))


def _plain(obj: Any) -> Any:
    """What :func:`to_jsonable` makes of a value JSON has no type for (dataclasses, paths)."""
    out = to_jsonable(obj)
    if out is obj:
        raise TypeError(f"{type(obj).__name__} is not JSON")
    return out


LONG_LIST = 100


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
    from hpcexp.app.views import human_size as size

    return size(n)


def human_age(seconds: float | None) -> str:
    from hpcexp.app.views import human_age as age

    return age(seconds)


Printer = Callable[[Any], None]
