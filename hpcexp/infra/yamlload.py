"""Strict YAML loading with line numbers, for hpcexp.yaml and sweep files.

``yaml.safe_load`` runs no code, but it expands aliases (a 300-byte "billion laughs" file
explodes when walked) and silently keeps the last of two duplicate keys. Here the file is
composed into a node tree with a loader that refuses aliases and anchors, every mapping
is checked for duplicate keys, and the result comes back with a table from dotted key
path to line number so that later validation can say *where* a bad value is.

Every command loads hpcexp.yaml, and composing YAML in pure Python (and importing PyYAML
at all) is most of what that costs. So the result of a successful load is kept in the
user's cache folder (``$XDG_CACHE_HOME/hpcexp/parsed/``) together with the file's exact
text, and a later load of the same path whose text is identical takes the kept data and
line table without importing yaml. Anything else parses as before: other text, a cache
file that is damaged or not this user's own, or data JSON cannot hold exactly (such a
load is not kept).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcexp.errors import ConfigError, shown

if TYPE_CHECKING:  # pragma: no cover
    import yaml

MAX_CONFIG_BYTES = 1024 * 1024
PARSED_FORMAT = 1

_loader_class: Any = None


def _no_alias_loader() -> Any:
    """SafeLoader that refuses anchors and aliases outright (PyYAML imported on first use)."""
    global _loader_class
    if _loader_class is not None:
        return _loader_class
    import yaml

    class _NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise ConfigError(f"{self.name}:{event.start_mark.line + 1}: YAML aliases are not allowed "
                                  f"(*{event.anchor})")
            event = self.peek_event()
            anchor = getattr(event, "anchor", None)
            if anchor is not None:
                raise ConfigError(f"{self.name}:{event.start_mark.line + 1}: YAML anchors are not allowed "
                                  f"(&{anchor})")
            return super().compose_node(parent, index)

    _loader_class = _NoAliasLoader
    return _loader_class


def _parsed_file(path: Path) -> Path:
    """Where the kept parse of ``path`` lives (the name is a checksum of its absolute path;
    the file records the path itself, so two paths never share one)."""
    import binascii

    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    key = os.path.abspath(path).encode("utf-8", "surrogateescape")
    return Path(root) / "hpcexp" / "parsed" / f"{binascii.crc32(key):08x}.json"


def _own(path: Path | str) -> bool:
    """Ours and writable by us alone: what a kept parse (which becomes configuration) must be."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _kept(path: Path, text: str) -> tuple[Any, dict[str, int]] | None:
    cache = _parsed_file(path)
    try:
        if not (_own(cache) and _own(cache.parent)):
            return None
        doc = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(doc, dict) and doc.get("format") == PARSED_FORMAT and doc.get("path") == os.path.abspath(path)
            and doc.get("text") == text and isinstance(doc.get("lines"), dict)):
        return None
    return doc.get("data"), doc["lines"]


def _keep(path: Path, text: str, data: Any, lines: dict[str, int]) -> None:
    """Best effort: without it the next load parses again."""
    doc = {"format": PARSED_FORMAT, "path": os.path.abspath(path), "text": text, "data": data, "lines": lines}
    try:
        encoded = json.dumps(doc, ensure_ascii=True)
        back = json.loads(encoded)
    except (TypeError, ValueError):  # dates, binary, non-string keys...: not kept
        return
    if back["data"] != data or not _same_types(back["data"], data):
        return
    cache = _parsed_file(path)
    try:
        from hpcexp.infra import atomic

        cache.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if _own(cache.parent):
            atomic.write_text(cache, encoded)
            _prune(cache.parent)
    except Exception:  # noqa: BLE001,S110 - a cache that cannot be written only costs time
        pass


KEEP_PARSED = 128


def _prune(folder: Path) -> None:
    """Forget the least recently written parses beyond 2 x KEEP_PARSED (files of projects
    long gone), so the folder does not grow forever; only after a parse was written."""
    with os.scandir(folder) as it:
        entries = [e for e in it if e.name.endswith(".json")]
    if len(entries) <= 2 * KEEP_PARSED:
        return
    entries.sort(key=lambda e: e.stat().st_mtime_ns)
    for e in entries[:len(entries) - KEEP_PARSED]:
        try:
            os.unlink(e.path)
        except OSError:
            pass


def _same_types(a: Any, b: Any) -> bool:
    """``a == b`` holds; also each value has the same type (1 == 1.0 == True in Python)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return all(type(k1) is type(k2) and _same_types(v1, v2) for (k1, v1), (k2, v2) in zip(a.items(), b.items()))
    if isinstance(a, list):
        return all(_same_types(x, y) for x, y in zip(a, b))
    return True


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
    kept = _kept(Path(path), text)
    if kept is not None:
        return kept
    data, lines = _parse(text, name)
    _keep(Path(path), text, data, lines)
    return data, lines


def _parse(text: str, name: str) -> tuple[Any, dict[str, int]]:
    import yaml

    try:
        loader = _no_alias_loader()(text)  # its reader refuses control characters right here
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


def _construct(loader: "yaml.SafeLoader", node: "yaml.Node", path: str, lines: dict[str, int], name: str) -> Any:
    import yaml

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
