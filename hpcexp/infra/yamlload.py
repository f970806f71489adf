"""Strict YAML loading with line numbers, for hpcexp.yaml and sweep files.

``yaml.safe_load`` runs no code, but it expands aliases (a 300-byte "billion laughs" file
explodes when walked) and silently keeps the last of two duplicate keys. Here the file is
composed into a node tree with a loader that refuses aliases and anchors, every mapping
is checked for duplicate keys, and the result comes back with a table from dotted key
path to line number so that later validation can say *where* a bad value is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from hpcexp.errors import ConfigError, shown

MAX_CONFIG_BYTES = 1024 * 1024


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases outright."""

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"{self.name}:{event.start_mark.line + 1}: YAML aliases are not allowed "
                              f"(*{event.anchor})")
        event = self.peek_event()
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise ConfigError(f"{self.name}:{event.start_mark.line + 1}: YAML anchors are not allowed (&{anchor})")
        return super().compose_node(parent, index)


def load_yaml(path: Path, *, label: str | None = None, inside: Path | str | None = None
              ) -> tuple[Any, dict[str, int]]:
    """Load ``path``; return (data, {dotted.path: line}). Raise ConfigError on any problem.

    ``inside``: the project root; a symlinked file whose target leaves it is refused before
    it is read (without it, any symlink is followed as before). FIFOs and devices are refused
    without being opened, so nothing blocks.
    """
    from hpcexp.infra.safeio import Unreadable, Unsafe, read_regular

    name = label or str(path)
    root = inside if inside is not None else "/"
    try:
        raw = read_regular(path, max_bytes=MAX_CONFIG_BYTES, what="file", inside=root)
    except FileNotFoundError as exc:
        raise ConfigError(f"{name}: file not found") from exc
    except (Unsafe, Unreadable) as exc:
        raise ConfigError(f"{name}: {exc.why}") from None
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read: {exc.strerror}") from exc
    if b"\x00" in raw:
        raise ConfigError(f"{name}: contains a NUL byte; not a YAML text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: not valid UTF-8 (byte {exc.start})") from exc
    try:
        loader = _NoAliasLoader(text)  # its reader refuses control characters right here
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name}: invalid YAML: {getattr(exc, 'reason', None) or 'unreadable text'}") from None
    loader.name = name  # type: ignore[attr-defined]
    try:
        node = loader.get_single_node()
        lines: dict[str, int] = {}
        data = _construct(loader, node, "", lines, name) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{name}{where}: invalid YAML: {exc.problem or exc.context}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name}: invalid YAML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{name}: nested too deeply") from exc
    finally:
        loader.dispose()
    return data, lines


def _construct(loader: yaml.SafeLoader, node: yaml.Node, path: str, lines: dict[str, int], name: str) -> Any:
    lines[path] = node.start_mark.line + 1
    expected = {"mapping": "tag:yaml.org,2002:map", "sequence": "tag:yaml.org,2002:seq"}.get(getattr(node, "id", ""))
    if expected is not None and node.tag != expected:
        raise ConfigError(f"{name}:{node.start_mark.line + 1}: {path or 'top level'}: invalid YAML: "
                          f"tag {shown(node.tag, 40)} is not allowed")
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        first_line: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise ConfigError(f"{name}:{key_node.start_mark.line + 1}: YAML merge keys (<<) are not allowed")
            key = _construct(loader, key_node, path, {}, name)
            if isinstance(key, (list, dict)):
                raise ConfigError(f"{name}:{key_node.start_mark.line + 1}: {path or 'top level'}: "
                                  "a key must be a plain value")
            line = key_node.start_mark.line + 1
            child = f"{path}.{key}" if path else str(key)
            if key in out:
                raise ConfigError(f"{name}:{line}: {child}: duplicate key (first at line {first_line[key]})")
            first_line[key] = line
            out[key] = _construct(loader, value_node, child, lines, name)
            lines[child] = line
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(loader, item, f"{path}[{i}]", lines, name) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)
