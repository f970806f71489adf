"""Plain JSON types from dataclasses, paths and tuples.

What ``--json`` prints, what the dashboard's API returns and what use-case results hand
out as JSON all go through :func:`to_jsonable`, so every edge spells a record the same
way. A module of its own, standard library only: ``hpcexp list --json`` needs it and
nothing else from the layers above.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

__all__ = ["to_jsonable"]


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
