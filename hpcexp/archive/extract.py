"""``extract_archive`` and its safety rules: an untrusted archive restored into a new folder.

Every member is validated before anything is written: absolute names, ``..``, links
leading outside the folder (also through chains of links), writing through a link,
device or FIFO members, and bounds on depth, name length, total size and compression
ratio. The tree is built in a temporary sibling folder and renamed when complete.
Everything here is about the destination folder, which is why it is apart from
``verify``; the second pass checks each file against MANIFEST.json as it is written.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from hpcexp.archive.base import CHUNK, Warn, show
from hpcexp.archive.manifest import MANIFEST_NAME, load_manifest
from hpcexp.archive.reader import READ_ERRORS, Corrupt, Member, detect_format, iter_members
from hpcexp.errors import Failure, Interrupted, UsageError
from hpcexp.infra import atomic
from hpcexp.infra.units import human_size as human


@dataclass(frozen=True)
class ExtractResult:
    path: Path
    format: str
    files: int
    bytes: int
    verified: bool                # every file matched MANIFEST.json


MAX_LINK_HOPS = 40
MAX_MEMBER_DEPTH = 128           # folders in one member path; results trees are far shallower
MAX_MEMBER_NAME = 2048           # bytes of one member path (PATH_MAX is 4096 with the destination)
MAX_COMPONENT = 255              # bytes of one path component (NAME_MAX)
DEFAULT_MAX_SIZE = 16 << 30      # total bytes an extraction writes unless --max-size / --allow-large
MAX_RATIO = 200                  # unpacked : packed, checked once more than RATIO_FLOOR is unpacked
RATIO_FLOOR = 64 << 20


def parse_size(text: str) -> int:
    """``10G``, ``500M``, ``64k`` or plain bytes (binary units) -> bytes; UsageError otherwise."""
    m = re.fullmatch(r"\s*(\d{1,15})\s*([kKmMgGtT]?)(i?B)?\s*", text or "")
    if not m:
        raise UsageError(f"invalid size {text[:40]!r}: use bytes or a number with K, M, G or T (e.g. 20G)")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2).lower()]


def _safe_name(name: str) -> tuple[str, str | None]:
    """(normalised name, why it is unsafe or None). ``./a//b`` becomes ``a/b``; ``.`` is ""."""
    if "\x00" in name:
        return name, "NUL byte in the name"
    if name.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", name):
        return name, "absolute path"
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        return name, "'..' in the path"
    return "/".join(parts), None


def _resolve_link(start_dir: list[str], target: str, links: dict[str, str]) -> str:
    """Where ``target`` (relative to ``start_dir``) leads, following the archive's own
    symlinks so a chain of links cannot step out: "inside", "outside" or "loop"."""
    if target.startswith("/"):
        return "outside"
    stack = list(start_dir)
    todo = [p for p in target.split("/") if p not in ("", ".")]
    hops = 0
    while todo:
        part = todo.pop(0)
        if part == "..":
            if not stack:
                return "outside"
            stack.pop()
            continue
        stack.append(part)
        key = "/".join(stack)
        if key in links:
            hops += 1
            if hops > MAX_LINK_HOPS:
                return "loop"
            nxt = links[key]
            if nxt.startswith("/"):
                return "outside"
            stack.pop()
            todo = [p for p in nxt.split("/") if p not in ("", ".")] + todo
    return "inside"


def _validate(path: Path, fmt: str, *, skip_outside_links: bool = False,
              warn: Warn | None = None, max_size: int | None = DEFAULT_MAX_SIZE,
              max_ratio: float | None = MAX_RATIO) -> tuple[set[str], dict[str, str]]:
    """First pass over an untrusted archive: refuse (UsageError naming the member) before
    anything is written. Returns the links to leave out (only with ``skip_outside_links``)
    and every validated link, which the second pass insists on finding unchanged."""
    names: set[str] = set()
    files: set[str] = set()
    links: dict[str, str] = {}

    def refuse(name: str, why: str) -> UsageError:
        return UsageError(f"refusing to extract {path}: member {show(name)}: {why}; nothing was written",
                          hint="the archive may be hostile or damaged; inspect it with `tar tvzf` / `unzip -l`")

    total = packed = 0
    zip_packed = True
    try:
        for m in iter_members(path, fmt):
            raw_len = len(m.name.encode("utf-8", "surrogateescape"))
            if raw_len > MAX_MEMBER_NAME:
                raise refuse(m.name[:200] + "...", f"path of {raw_len} bytes, more than the {MAX_MEMBER_NAME} allowed")
            name, why = _safe_name(m.name)
            if why:
                raise refuse(m.name, why)
            depth = name.count("/") + 1
            if depth > MAX_MEMBER_DEPTH:
                raise refuse(name[:200] + "...", f"path {depth} levels deep, more than the {MAX_MEMBER_DEPTH} allowed")
            if any(len(p.encode("utf-8", "surrogateescape")) > MAX_COMPONENT for p in name.split("/")):
                raise refuse(name, f"a path component longer than {MAX_COMPONENT} bytes")
            if m.kind == "file":
                total += m.size
                if m.packed is None:
                    zip_packed = False
                else:
                    packed += m.packed
                if max_size is not None and total > max_size:
                    raise refuse(m.name, f"the archive unpacks to more than {human(max_size)} "
                                 "(use --max-size SIZE or --allow-large if that is expected)")
            if not name:
                if m.kind == "dir":
                    continue  # "./": the destination itself
                raise refuse(m.name, "empty name")
            if m.kind == "special":
                raise refuse(m.name, f"{m.detail} members are never extracted")
            if name in names:
                raise refuse(m.name, "appears twice in the archive")
            parts = name.split("/")
            for i in range(1, len(parts)):
                parent = "/".join(parts[:i])
                if parent in links:
                    raise refuse(m.name, f"would be written through the symlink {show(parent)}")
                if parent in files:
                    raise refuse(m.name, f"its parent {show(parent)} is a file")
            if m.kind == "symlink":
                if not m.target:
                    raise refuse(m.name, "symlink with an empty target")
                if m.target.startswith("/") and not skip_outside_links:
                    raise refuse(m.name, f"symlink to the absolute path {show(m.target)}")
                links[name] = m.target
            elif m.kind == "hardlink":
                tname, why = _safe_name(m.target)
                if why or tname not in files:
                    raise refuse(m.name, f"hard link to {show(m.target)}, which is not a file extracted before")
                files.add(name)
            elif m.kind == "file":
                files.add(name)
            names.add(name)
    except Corrupt as exc:
        raise Failure(f"{path} is damaged at member {show(exc.member)}: {exc.detail}; nothing was written") from None
    if max_ratio is not None and total > RATIO_FLOOR:
        try:
            on_disk = packed if (fmt == "zip" and zip_packed) else os.stat(path).st_size
        except OSError:
            on_disk = 0
        ratio = total / max(on_disk, 1)
        if ratio > max_ratio:
            raise UsageError(f"refusing to extract {path}: it unpacks to {human(total)} from {human(on_disk)} "
                             f"(ratio {ratio:.0f}:1, more than {max_ratio:.0f}:1); nothing was written",
                             hint="a compression bomb, or very repetitive data: pass --allow-large if you trust it")
    skip: set[str] = set()
    while True:  # leaving a link out changes where others lead: repeat until stable
        kept = {n: t for n, t in links.items() if n not in skip}
        bad = [n for n, t in sorted(kept.items()) if _resolve_link(n.split("/")[:-1], t, kept) == "outside"]
        if not bad:
            break
        if not skip_outside_links:
            raise refuse(bad[0], f"symlink to {show(links[bad[0]])} leads outside the destination")
        skip.update(bad)
    for name in skip:
        if warn is not None:
            warn(f"{show(name)}: symlink to {show(links[name])} leads outside the destination; left out")
    for name in names:
        parts = name.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in links:
                raise refuse(name, f"would be written through the symlink {show('/'.join(parts[:i]))}")
    return skip, links


def extract_archive(path: Path | str, dest: Path | str, *, skip_outside_links: bool = False,
                    warn: Warn | None = None, max_size: int | None = DEFAULT_MAX_SIZE,
                    allow_large: bool = False) -> ExtractResult:
    """Restore an archive into ``dest`` (new or empty), refusing anything unsafe.

    Every member is validated before the first byte is written; the tree is built in a
    temporary sibling folder and renamed to ``dest`` when complete (removed on any failure,
    without recursion). When the archive has an hpcexp manifest, each file's sha256 is
    checked as it is written. Member paths are bounded in depth and length; the total size
    (``max_size``) and the compression ratio are limited unless ``allow_large``.
    """
    path, dest = Path(path), Path(os.path.abspath(dest))
    fmt = detect_format(path)
    if dest.is_symlink():
        raise UsageError(f"destination {dest} is a symlink", hint="extract into a new folder")
    if dest.exists():
        if not dest.is_dir():
            raise UsageError(f"destination {dest} exists and is not a folder")
        if any(dest.iterdir()):
            raise UsageError(f"destination {dest} is not empty",
                             hint="extract into a new or empty folder (nothing is ever overwritten)")
    skip, links = _validate(path, fmt, skip_outside_links=skip_outside_links, warn=warn,
                            max_size=None if allow_large else max_size, max_ratio=None if allow_large else MAX_RATIO)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise atomic.storage_error(exc, dest.parent) from exc
    tmp = atomic.tmp_name_for(dest)
    try:
        tmp.mkdir(mode=0o700)
    except OSError as exc:
        raise atomic.storage_error(exc, tmp) from exc
    try:
        files, total, verified = _extract_into(path, fmt, tmp, skip, links)
        os.chmod(tmp, 0o755)
        try:
            os.replace(tmp, dest)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise UsageError(f"destination {dest} was filled while extracting; nothing was written") from None
            raise
        atomic.fsync_dir(dest.parent)
    except BaseException as exc:
        _remove_tree(str(tmp))
        if isinstance(exc, OSError):
            raise atomic.storage_error(exc, dest) from exc
        if isinstance(exc, KeyboardInterrupt):  # Ctrl-C, or SIGTERM through the CLI
            raise Interrupted(f"interrupted while extracting into {dest}; nothing was written") from None
        raise
    return ExtractResult(path=dest, format=fmt, files=files, bytes=total, verified=verified)


def _remove_tree(top: str) -> None:
    """rm -rf ``top`` without recursion and by directory descriptors: a hostile tree may be
    deeper than Python's stack, than PATH_MAX and than the descriptor limit (only one
    folder is open at a time; ``..`` leads back up). Links are never followed; errors are
    ignored (best effort on a failure path), and the walk always ends."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(top, flags)
    except OSError:
        return
    stack: list[tuple[str, set[str]]] = [("", set())]   # (name in parent, names to skip here)
    try:
        while stack:
            skip = stack[-1][1]
            child = None
            try:
                with os.scandir(fd) as it:
                    for e in it:
                        if e.name in skip:
                            continue
                        if e.is_dir(follow_symlinks=False):
                            child = e.name
                            break
                        try:
                            os.unlink(e.name, dir_fd=fd)
                        except OSError:
                            skip.add(e.name)
            except OSError:
                pass
            if child is not None:
                try:
                    nfd = os.open(child, flags, dir_fd=fd)
                except OSError:
                    skip.add(child)
                    continue
                os.close(fd)
                fd = nfd
                stack.append((child, set()))
                continue
            name, _ = stack.pop()
            if not stack:
                break
            try:
                pfd = os.open("..", flags, dir_fd=fd)
            except OSError:
                break
            os.close(fd)
            fd = pfd
            try:
                os.rmdir(name, dir_fd=fd)
            except OSError:
                stack[-1][1].add(name)
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        os.rmdir(top)


def _extract_into(path: Path, fmt: str, root: Path, skip: set[str],
                  links: dict[str, str]) -> tuple[int, int, bool]:
    expected: dict[str, Any] | None = None
    mismatches: list[str] = []
    files = total = 0
    dirfd_root = str(root)
    try:
        for i, m in enumerate(iter_members(path, fmt)):
            name, why = _safe_name(m.name)
            if why or (not name and m.kind != "dir"):  # validated before; the archive changed since
                raise UsageError(f"refusing to extract {path}: member {show(m.name)}: {why or 'empty name'}")
            if not name or name in skip:
                continue
            target = os.path.join(dirfd_root, *name.split("/"))
            parent = os.path.dirname(target)
            _make_dirs(dirfd_root, parent)
            if m.kind == "dir":
                if not os.path.lexists(target):
                    os.mkdir(target, 0o755)
            elif m.kind == "symlink":
                if links.get(name) != m.target:  # the archive was swapped after validation
                    raise UsageError(f"refusing to extract {path}: member {show(m.name)} changed while extracting")
                os.symlink(m.target, target)
            elif m.kind == "hardlink":
                tname, _ = _safe_name(m.target)
                os.link(os.path.join(dirfd_root, *tname.split("/")), target, follow_symlinks=False)
            elif m.kind == "file":
                size, digest = _write_member(m, target)
                if i == 0 and m.name == MANIFEST_NAME:
                    expected = _read_extracted_manifest(target, path)
                files += 1
                total += size
                if expected is not None and i != 0:
                    want = expected.get(m.name)
                    if want is None or want[0] != "file" or want[1] != size or want[2] != bytes.fromhex(digest):
                        mismatches.append(m.name)
            else:  # validated away in the first pass; never reached
                raise UsageError(f"member {show(m.name)} cannot be extracted")
    except Corrupt as exc:
        raise Failure(f"{path} is damaged at member {show(exc.member)}: {exc.detail}; nothing was written") from None
    if mismatches:
        more = len(mismatches) - 1
        raise Failure(f"{path}: {show(mismatches[0])} does not match {MANIFEST_NAME}"
                      + (f" (and {more} more)" if more else "") + "; nothing was written",
                      hint=f"`hpcexp archive --verify {path}` lists every difference")
    return files, total, expected is not None


def _read_extracted_manifest(target: str, archive: Path) -> dict[str, Any] | None:
    """The file entries of an extracted MANIFEST.json, or None if it is not an hpcexp one."""
    def opener() -> IO[bytes]:
        return open(target, "rb")

    member = Member(MANIFEST_NAME, "file", open=opener)
    try:
        return load_manifest(member, archive)[1]
    except Failure:
        return None


def _make_dirs(root: str, parent: str) -> None:
    """mkdir -p below ``root``, refusing to pass through anything but real folders."""
    rel = os.path.relpath(parent, root)
    if rel == ".":
        return
    cur = root
    for part in rel.split(os.sep):
        cur = os.path.join(cur, part)
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            os.mkdir(cur, 0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"refusing to write below {cur}: not a folder (symlink or file)")


def _write_member(m: Member, target: str) -> tuple[int, str]:
    assert m.open is not None
    mode = (m.mode & 0o755) | 0o600
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
    h = hashlib.sha256()
    size = 0
    try:
        with m.open() as src, open(fd, "wb", closefd=False) as dst:
            while True:
                data = src.read(CHUNK)
                if not data:
                    break
                h.update(data)
                dst.write(data)
                size += len(data)
        os.fchmod(fd, mode)
    except READ_ERRORS as exc:
        raise Corrupt(m.name, f"{type(exc).__name__}: {exc}") from None
    finally:
        os.close(fd)
    return size, h.hexdigest()
