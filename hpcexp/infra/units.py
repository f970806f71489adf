"""Sizes for people: one formatter, so the CLI, the dashboard and archive messages agree."""

from __future__ import annotations


def human_size(n: int | None) -> str:
    """``1.5 MiB`` style (binary units, one decimal above bytes); ``-`` for an unknown size."""
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
