"""The value checks every section of hpcexp.yaml is validated with.

:class:`Checks` collects problems instead of raising at the first: each names the file,
line and dotted key path, so one run of ``hpcexp list`` reports every bad value at once
(:func:`hpcexp.core.config.load_project` raises them as one ConfigError, exit code 2).
The section rules (:mod:`hpcexp.core.sections`) and the project's top level
(:mod:`hpcexp.core.schema`) build on it.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Any, Mapping, Sequence

from hpcexp.core.model import (
    CONTROL_RE,
    _close_matches,
)


class Checks:
    """Problems collected while reading one hpcexp.yaml, and the checks of single values."""

    def __init__(self, label: str, lines: Mapping[str, int], root: Path) -> None:
        self.label = label
        self.lines = lines
        self.root = root
        self.problems: list[str] = []

    def err(self, path: str, msg: str) -> None:
        line = self.lines.get(path)
        where = f"{self.label}:{line}" if line else self.label
        self.problems.append(f"{where}: {path or '(top level)'}: {msg}")

    def keys(self, path: str, value: Mapping[Any, Any], allowed: Sequence[str]) -> None:
        for key in value:
            if not isinstance(key, str):
                self.err(path, f"key {key!r} must be a string")
            elif key not in allowed:
                close = _close_matches(key, allowed, n=1, cutoff=0.6)
                suggestion = f" (did you mean {close[0]!r}?)" if close else \
                    f" (allowed: {', '.join(allowed)})"
                self.err(f"{path}.{key}" if path else key, f"unknown key {key!r}{suggestion}")

    def mapping(self, path: str, value: Any) -> dict[Any, Any] | None:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.err(path, f"must be a mapping, got {_typename(value)} {_show(value)}")
            return None
        return value

    def string(self, path: str, value: Any, *, allow_control: bool = False,
               pattern: re.Pattern[str] | None = None, rule: str = "") -> str | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            self.err(path, f"must be a string, got {_typename(value)} {_show(value)}")
            return None
        text = str(value)
        if not allow_control and CONTROL_RE.search(text):
            self.err(path, f"control characters are not allowed: {_show(text)}")
            return None
        if "\x00" in text:
            self.err(path, f"NUL bytes are not allowed: {_show(text)}")
            return None
        if pattern is not None and not pattern.match(text):
            self.err(path, f"invalid value {_show(text)}{': ' + rule if rule else ''}")
            return None
        return text

    def integer(self, path: str, value: Any, lo: int, hi: int) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.err(path, f"must be a whole number from {lo} to {hi}, got {_show(value)}")
            return None
        if not lo <= value <= hi:
            self.err(path, f"must be from {lo} to {hi}, got {value}")
            return None
        return value

    def boolean(self, path: str, value: Any, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            self.err(path, f"must be true or false, got {_show(value)}")
            return default
        return value

    def str_list(self, path: str, value: Any, *, split: bool = False,
                 allow_control: bool = False) -> tuple[str, ...] | None:
        if value is None:
            return None
        if isinstance(value, str) and split:
            try:
                return tuple(shlex.split(value))
            except ValueError as exc:
                self.err(path, f"cannot split {_show(value)} into words: {exc}")
                return None
        if not isinstance(value, list):
            self.err(path, f"must be a list of strings, got {_typename(value)} {_show(value)}")
            return None
        out = []
        for i, item in enumerate(value):
            s = self.string(f"{path}[{i}]", item, allow_control=allow_control)
            if s is not None:
                out.append(s)
        return tuple(out)

    def str_map(self, path: str, value: Any, *, key_re: re.Pattern[str], key_rule: str,
                allow_control: bool) -> dict[str, str]:
        m = self.mapping(path, value)
        out: dict[str, str] = {}
        for k, v in (m or {}).items():
            kp = f"{path}.{k}"
            if not isinstance(k, str) or not key_re.match(k):
                self.err(kp, f"invalid name {_show(k)}: {key_rule}")
                continue
            if isinstance(v, (dict, list)) or v is None:
                self.err(kp, f"must be a string or number, got {_typename(v)}")
                continue
            s = self.string(kp, _scalar_text(v), allow_control=allow_control)
            if s is not None:
                out[k] = s
        return out

    def path_in_project(self, path: str, value: Any, *, allow_absolute: bool) -> Path | None:
        s = self.string(path, value)
        if s is None:
            return None
        expanded = os.path.expanduser(os.path.expandvars(s))
        p = Path(expanded)
        if p.is_absolute():
            if not allow_absolute:
                self.err(path, f"must be a path inside the project, got absolute {_show(s)}")
                return None
            return Path(os.path.normpath(p))
        resolved = Path(os.path.normpath(self.root / p))
        if resolved != self.root and self.root not in resolved.parents:
            self.err(path, f"path {_show(s)} escapes the project folder")
            return None
        return resolved

    def relpath_inside(self, path: str, value: Any) -> str | None:
        """A relative path that must stay inside the folder it is relative to."""
        s = self.string(path, value)
        if s is None:
            return None
        norm = os.path.normpath(s)
        if os.path.isabs(s) or norm == ".." or norm.startswith("../") or norm == ".":
            self.err(path, f"must be a relative path inside the experiment, got {_show(s)}")
            return None
        return norm

    def container_path(self, path: str, value: Any) -> str | None:
        s = self.string(path, value)
        if s is None:
            return None
        if not s.startswith("/") or "," in s or ":" in s:
            self.err(path, f"must be an absolute container path without ',' or ':', got {_show(s)}")
            return None
        return os.path.normpath(s)

    def number(self, path: str, value: Any, lo: float, hi: float) -> float | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            self.err(path, f"must be a number from {lo:g} to {hi:g}, got {_show(value)}")
            return None
        return float(value)


def _typename(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "nothing"}.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "...'"


def _scalar_text(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return str(value)
    return value
