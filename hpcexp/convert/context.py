"""The build context as Docker sends it: ``.dockerignore`` rules, lazy folder walks, archive detection.

Split from the interpreter because it is about the file system, not about Dockerfile
meaning: which context paths a COPY source names, what .dockerignore leaves out, and
whether ADD would extract a file.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
from pathlib import Path
from typing import Iterable

from hpcexp.errors import ConvertError


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A Go filepath.Match pattern (with Docker's ``**``) as a regex on '/'-separated paths."""
    out = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            if pattern.startswith("**", i):
                i += 2
                if i < n and pattern[i] == "/":
                    i += 1
                    out.append("(?:.*/)?")
                else:
                    out.append(".*")
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j == -1:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:j]
                if body.startswith("^") or body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


class IgnoreRules:
    """.dockerignore: Go-style patterns, ``**``, ``!`` exceptions; a matching parent excludes its children."""

    def __init__(self, lines: Iterable[str]) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            neg = line.startswith("!")
            if neg:
                line = line[1:].strip()
            line = posixpath.normpath(line.replace("\\", "/")).lstrip("/")
            if line in (".", ""):
                continue
            self.rules.append((neg, _pattern_regex(line)))

    def ignored(self, rel: str) -> bool:
        if not self.rules:
            return False
        parts = rel.split("/")
        prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
        result = False
        for neg, rx in self.rules:
            if any(rx.match(p) for p in prefixes):
                result = not neg
        return result


class BuildContext:
    """The files Docker would send as build context, .dockerignore applied.

    Folders are walked lazily, only those a COPY/ADD names (a plain file costs one stat),
    which keeps converting cheap when the context also holds data and checkpoints.

    What the conversion read of the file system is kept (:meth:`observed`): the ignore files
    tried, each folder's listing and each path's kind. Together with the content of the
    files copied in, that is everything the recipe depends on in the context, so a cached
    run can tell the recipe is unchanged without converting again (``hpcexp.build.inputs``).
    """

    def __init__(self, root: Path, dockerfile: Path) -> None:
        self.root = root
        self.base = str(root).rstrip("/") or "/"
        lines: list[str] = []
        self._ignore_seen: list[tuple[str, bytes | None, str | None]] = []
        for ignore_file in (str(dockerfile) + ".dockerignore", os.path.join(self.base, ".dockerignore")):
            if not os.access(ignore_file, os.F_OK):  # no exception object when it is absent (the usual case)
                self._ignore_seen.append((ignore_file, None, None))
                continue
            real = os.path.realpath(ignore_file)
            if os.path.islink(ignore_file) and not (real == os.path.realpath(self.base) or real.startswith(
                    os.path.realpath(self.base).rstrip("/") + "/")):
                raise ConvertError(f"{os.path.basename(ignore_file)} is a symbolic link leading outside the build "
                                   f"context (to {real}); refusing to read it")
            try:
                with open(ignore_file, "rb") as fh:
                    raw = fh.read()
                lines = raw.decode("utf-8", errors="replace").splitlines()
                self._ignore_seen.append((ignore_file, raw, real if os.path.islink(ignore_file) else None))
                break
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                self._ignore_seen.append((ignore_file, None, None))
                continue
            except OSError as exc:
                raise ConvertError(f"cannot read {os.path.basename(ignore_file)}: {exc.strerror}") from None
        self.rules = IgnoreRules(lines)
        self.has_rules = bool(self.rules.rules)
        self._walked: dict[str, tuple[list[str], list[str], bool]] = {}
        self._kinds: dict[str, str] = {}
        self._ignored: dict[str, list[str]] = {}
        self._listings: dict[str, list[str] | None] = {}  # folder -> its entries as read ("name/" for folders)

    def _abs(self, rel: str) -> str:
        return os.path.join(self.base, rel) if rel else self.base

    def _walk(self, rel: str) -> tuple[list[str], list[str], bool]:
        """(files, folders, something ignored) under folder ``rel``, relative to the context."""
        got = self._walked.get(rel)
        if got is not None:
            return got
        files: list[str] = []
        dirs: list[str] = []
        ignored = False
        ignored_paths: list[str] = []
        rules = self.rules if self.has_rules else None
        negations = rules is not None and any(neg for neg, _ in rules.rules)
        stack = [(self._abs(rel), rel)]
        while stack:
            path, rdir = stack.pop()
            try:
                entries = list(os.scandir(path))
            except OSError:
                self._listings[path] = None
                continue
            seen: list[str] = []
            self._listings[path] = seen
            for e in entries:
                r = f"{rdir}/{e.name}" if rdir else e.name
                is_dir = e.is_dir(follow_symlinks=False)
                seen.append(e.name + "/" if is_dir else e.name)
                if rules is not None and rules.ignored(r) and not (is_dir and negations):
                    ignored = True
                    ignored_paths.append(r)
                    continue
                if is_dir:
                    dirs.append(r)
                    stack.append((e.path, r))
                else:
                    files.append(r)
        files.sort()
        dirs.sort()
        self._walked[rel] = (files, dirs, ignored)
        self._ignored[rel] = sorted(ignored_paths)
        return files, dirs, ignored

    def observed(self) -> dict[str, object]:
        """What was read of the file system: ``ignore`` [path, sha256 or None, link target or
        None] for each ignore file tried, in order; ``dirs`` {folder: sha256 of its sorted
        listing, or None when unreadable}; ``kinds`` {path: "dir", "file" or ""}.
        Absolute paths; :mod:`hpcexp.build.inputs` checks them again the same way."""
        import hashlib

        from hpcexp.infra.hashing import listing_digest

        return {
            "ignore": [[p, hashlib.sha256(raw).hexdigest() if raw is not None else None, link]
                       for p, raw, link in self._ignore_seen],
            "dirs": {p: (None if names is None else listing_digest(names)) for p, names in self._listings.items()},
            "kinds": {self._abs(rel): kind for rel, kind in self._kinds.items()},
        }

    def ignored_paths(self, rel: str) -> list[str]:
        """What .dockerignore removed under folder ``rel`` (the outermost ignored paths)."""
        self._walk(rel)
        return self._ignored[rel]

    @property
    def files(self) -> list[str]:
        return self._walk("")[0]

    def _kind(self, rel: str) -> str:
        """'dir', 'file' (files and symlinks, as Docker copies links as links) or ''."""
        kind = self._kinds.get(rel)
        if kind is None:
            try:
                mode = os.lstat(self._abs(rel)).st_mode
                kind = "dir" if stat.S_ISDIR(mode) else "file"
            except OSError:
                kind = ""
            self._kinds[rel] = kind
        return kind

    def is_dir(self, rel: str) -> bool:
        if self._kind(rel) != "dir":
            return False
        return not (rel and self.has_rules and self.rules.ignored(rel) and not self._walk(rel)[0])

    def is_file(self, rel: str) -> bool:
        if not rel or self._kind(rel) != "file":
            return False
        return not (self.has_rules and self.rules.ignored(rel))

    def under(self, rel: str) -> list[str]:
        return self._walk(rel)[0]

    def filtered(self, rel: str) -> bool:
        """True when .dockerignore removed something under folder ``rel``."""
        return self._walk(rel)[2]

    def match(self, pattern: str) -> list[str]:
        """Context paths (files or folders) matching a COPY source after normalisation."""
        if not any(ch in pattern for ch in "*?["):
            if self.is_file(pattern) or self.is_dir(pattern):
                return [pattern]
            return []
        fixed = pattern.split("/")
        prefix_parts = []
        for part in fixed:
            if any(ch in part for ch in "*?["):
                break
            prefix_parts.append(part)
        prefix = "/".join(prefix_parts)
        if prefix and not self.is_dir(prefix):
            return []
        files, dirs, _ = self._walk(prefix)
        rx = _pattern_regex(pattern)
        out = sorted(c for c in (*files, *dirs) if rx.match(c))
        # a folder and files under it can both match: keep the outermost
        return [c for c in out if not any(c.startswith(o + "/") for o in out if o != c)]


DECOMPRESS = {"gz": "gzip", "bz2": "bzip2", "xz": "xz", "zst": "zstd"}


def archive_kind(path: str) -> str:
    """'tar', 'gz', 'bz2', 'xz', 'zst' when Docker's ADD would extract ``path`` (by content, as Docker)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError:
        return ""
    for magic, kind in ((b"\x1f\x8b", "gz"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zst")):
        if head.startswith(magic):
            return kind
    return "tar" if len(head) >= 262 and head[257:262] == b"ustar" else ""
