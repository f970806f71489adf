"""Dockerfile -> Apptainer recipe conversion, with a fidelity report.

The build, the CLI and the tests depend only on :class:`Conversion`, :class:`Note`,
:class:`BaseResolution` and :func:`convert` below.

Pipeline (why it looks like this, and the codes P01..P33 of the fidelity report: docs/conversion.md):

1. :mod:`hpcexp.convert.dockerfile` tokenizes the Dockerfile (directives, continuations, comments,
   heredocs, flags, JSON form). spython reads raw lines and guesses, which is where most of
   its defects come from, so it never sees the file as a whole.
2. Each instruction is interpreted with Docker's semantics: ARGs are resolved at conversion
   time (Dockerfile default < hpcexp.yaml ``build_args`` < ``--build-arg``) into literal
   values, because ``%arguments``/``{{ }}`` need Apptainer >= 1.2 and recipes must build on
   Apptainer 1.1 and SingularityCE 3.9; ENV is exported in ``%post`` where it appears and
   written to ``%environment``; COPY/ADD go to a staging folder through ``%files`` and are
   moved into place in ``%post`` at their original position (P06); RUN keeps Docker's
   ``sh -c`` semantics by running in a subshell without ``-e`` (or through SHELL).
3. spython does what it does right: it splits ``KEY=VALUE`` pairs of ENV/LABEL lines
   (``DockerParser.parse_env``, cross-checked against our own tokenizer, which wins on the
   cases spython gets wrong, P10) and writes the ``%files``/``%labels``/``%environment``
   sections (its writer's ``create_keyval_section``/``create_env_section``). Every spython
   call goes through :func:`_spython`, which turns an exception or ``sys.exit`` into a
   ConvertError naming the Dockerfile line and keeps spython's logger off the terminal.

Paths in ``%files`` and a ``localimage`` base inside the project are written *relative to
the build context*, so recipes are identical across clones: run ``apptainer build`` with
the context as the working directory.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import os
import posixpath
import re
import shlex
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from hpcexp import __version__
from hpcexp.convert import dockerfile as dfmod
from hpcexp.convert.dockerfile import (
    Dockerfile,
    Instruction,
    Value,
    WordProcessor,
    has_refs,
    literal,
    render_shell,
    split_key_values,
)
from hpcexp.errors import ConvertError

if TYPE_CHECKING:  # pragma: no cover
    pass

log = logging.getLogger(__name__)


_SLOTS = dfmod.SLOTS

@dataclass(frozen=True)
class Note:
    """One line of the fidelity report."""

    line: int            # Dockerfile line (1-based; 0 when not tied to a line)
    construct: str       # e.g. "USER", "RUN --mount=type=cache", "COPY --chown"
    action: str          # "translated" | "approximated" | "dropped"
    reason: str          # why, in one sentence a researcher understands
    code: str | None = None  # defect code from the spython gap catalogue (P01..P31) when relevant


@dataclass(frozen=True)
class BaseResolution:
    """What a FROM reference became: the recipe header ``Bootstrap: X`` / ``From: Y``."""

    bootstrap: str       # "docker" | "localimage" | "oras" | "library" | ...
    source: str          # the From: value (a path for localimage, a reference otherwise)
    headers: tuple[tuple[str, str], ...] = ()  # extra header lines (debootstrap: OSVersion, MirrorURL, Include)
    environment: tuple[tuple[str, str], ...] = ()  # the base image's environment, when hpcexp can read it
    notes: tuple[tuple[str, str], ...] = ()    # (action, reason) for the report, e.g. a stand-in's differences


@dataclass(frozen=True)
class Conversion:
    """The result of converting one Dockerfile."""

    recipe: str                                   # full .def text, deterministic
    notes: tuple[Note, ...]
    dockerfile: Path
    dockerfile_sha256: str
    context: Path
    arch: str
    context_files: tuple[tuple[str, Path], ...] = ()  # (path relative to context, absolute path) copied in
    base_refs: tuple[str, ...] = ()               # external FROM references after ARG resolution, stage order
    workdir: str | None = None                    # final WORKDIR of the last stage, if any
    build_args: Mapping[str, str] = field(default_factory=dict)  # resolved ARG values used
    source_label: str = ""                        # how the recipe header names the Dockerfile
    cmd: tuple[str, ...] | None = None            # last stage's CMD as an argv (shell form: sh -c TEXT)
    entrypoint: tuple[str, ...] | None = None     # last stage's ENTRYPOINT as an argv
    environment: Mapping[str, str] = field(default_factory=dict)  # the image's known environment (base + ENV)
    stopsignal: str | None = None                 # last stage's STOPSIGNAL, as a signal name (SIGINT...)

    @property
    def approximated(self) -> bool:
        return any(n.action != "translated" for n in self.notes)

    def counts(self) -> dict[str, int]:
        out = {"translated": 0, "approximated": 0, "dropped": 0}
        for n in self.notes:
            out[n.action] = out.get(n.action, 0) + 1
        return out

    def report(self, recipe_name: str | None = None) -> dict[str, Any]:
        """The fidelity report as saved in NAME.ARCH.report.json (no machine-specific paths)."""
        return {
            "dockerfile": self.source_label,
            "dockerfile_sha256": self.dockerfile_sha256,
            "hpcexp_version": __version__,
            "arch": self.arch,
            "recipe": recipe_name,
            "base_refs": list(self.base_refs),
            "build_args": dict(sorted(self.build_args.items())),
            "workdir": self.workdir,
            "stopsignal": self.stopsignal,
            "context_files": [rel for rel, _ in self.context_files],
            "counts": self.counts(),
            "notes": [{"line": n.line, "construct": n.construct, "action": n.action, "reason": n.reason,
                       "code": n.code} for n in self.notes],
        }


BaseResolver = Callable[[str], "BaseResolution | None"]

STAGING = "/.hpcexp"
DEFAULT_SHELL = ("/bin/sh", "-c")
_STAGE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_BAD_REF = re.compile(r"[\s\x00-\x1f\x7f]")
_ARG_COMMENT = re.compile(r"(^|\s)#")
_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SPACES = re.compile(r"\s+")
_REF = "\x00"  # brackets a base-image variable inside a path (see _q)
_LEGACY_SPLIT = re.compile(r"[\t\v\f\r ]+")
_CHMOD = re.compile(r"[0-7]{3,4}|[ugoa]*[-+=][rwxXst]*(,[ugoa]*[-+=][rwxXst]*)*")
_CHOWN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(:[A-Za-z0-9_][A-Za-z0-9_.-]*)?")
_URL = re.compile(r"^(https?|git)://|^git@")
_SIMPLE_PAIRS = re.compile(r"""\s*(?:[A-Za-z_][A-Za-z0-9_.-]*=(?:"[^"\\`]*"|'[^'\\`]*'|[^\s"'\\`]+)(?:\s+|$))+""")
_CP_FUNC = r'''_hpcexp_cp() {  # Docker COPY semantics: a folder's contents, or a file (into DEST if a folder)
    if [ -d "$1" ] && [ ! -L "$1" ]; then mkdir -p "$2" && cp -a "$1/." "$2/"
    elif [ "$3" = dir ] || [ -d "$2" ]; then mkdir -p "$2" && cp -a "$1" "$2/"
    else mkdir -p "$(dirname "$2")" && cp -a "$1" "$2"; fi
}'''

_AS_FUNC = r'''_hpcexp_as() {  # USER: run one step as USER[:GROUP] (Docker), if this build can switch users
    _u="${1%%:*}"; _g=""; case "$1" in *:*) _g="${1#*:}";; esac; shift
    case "$_u" in ""|root|0) "$@"; return;; esac
    _uid=$(id -u "$_u" 2>/dev/null || echo "$_u")
    [ -n "$_g" ] || _g=$(id -g "$_u" 2>/dev/null || echo "$_uid")
    _gid=$(awk -F: -v g="$_g" '$1 == g { print $3; exit }' /etc/group 2>/dev/null || true)
    [ -n "$_gid" ] || _gid="$_g"
    _home=$(awk -F: -v u="$_uid" '$3 == u { print $6; exit }' /etc/passwd 2>/dev/null || true)
    [ -n "$_home" ] || _home=/
    for _sp in /usr/bin/setpriv /bin/setpriv setpriv; do  # util-linux's (busybox's cannot switch users)
        if "$_sp" --reuid="$_uid" --regid="$_gid" --clear-groups true 2>/dev/null; then
            HOME="$_home" USER="$_u" "$_sp" --reuid="$_uid" --regid="$_gid" --clear-groups "$@"
            return
        fi
    done
    echo "hpcexp: warning: cannot switch to user $_u (needs setpriv, subordinate ids): step runs as root" >&2
    "$@"
}'''
_MOUNT_FUNC = r'''_hpcexp_hide() {  # RUN --mount: TARGET is an empty folder for one step, what it held is put aside
    if [ -e "$1" ] || [ -L "$1" ]; then mkdir -p /.hpcexp/hidden && mv "$1" "/.hpcexp/hidden/$2"; fi
    mkdir -p "$1"; cd "$PWD" 2>/dev/null || true
}
_hpcexp_unhide() {  # after the step: drop what the step left there, put the original back
    rm -rf "$1"
    if [ -e "/.hpcexp/hidden/$2" ] || [ -L "/.hpcexp/hidden/$2" ]; then mv "/.hpcexp/hidden/$2" "$1"; fi
    cd "$PWD" 2>/dev/null || true
}'''


# --------------------------------------------------------------------------------------
# spython, wrapped
# --------------------------------------------------------------------------------------

_SPY: dict[str, Any] = {}


def _spython_mod() -> dict[str, Any]:
    """Import spython lazily (it is slow to import) and silence its logger for good."""
    if not _SPY:
        try:
            from spython.logger import bot
            from spython.main.parse.parsers.docker import DockerParser
            from spython.main.parse.writers import singularity as writer
        except Exception as exc:  # noqa: BLE001 - any import failure is an environment problem
            from hpcexp.errors import EnvironmentProblem

            raise EnvironmentProblem(f"cannot import spython: {exc}",
                                     hint="pip install 'spython>=0.3.14'") from None
        bot.level = -3                      # errors only, and only into our buffer (never the terminal)
        bot.colorize = False
        bot.errorStream = io.StringIO()
        bot.outputStream = io.StringIO()
        _SPY.update(bot=bot, parser=DockerParser(filename=None, load=False), writer=writer)
    return _SPY


def _spython(label: str, line: int, what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Call spython; an exception or sys.exit becomes a ConvertError naming the line."""
    bot = _SPY.get("bot")
    try:
        return fn(*args)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - spython raises anything, or exits
        said = ""
        if bot is not None and isinstance(bot.errorStream, io.StringIO):
            last = bot.errorStream.getvalue().strip().splitlines()[-1:]
            said = last[0].removeprefix("ERROR").strip() if last else ""
            bot.errorStream.seek(0)
            bot.errorStream.truncate()
        detail = said or (f"exit {exc.code}" if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}")
        raise ConvertError(f"{label}:{line}: spython failed on {what}: {detail}") from None


# --------------------------------------------------------------------------------------
# Build context and .dockerignore
# --------------------------------------------------------------------------------------

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
    """

    def __init__(self, root: Path, dockerfile: Path) -> None:
        self.root = root
        self.base = str(root).rstrip("/") or "/"
        lines: list[str] = []
        for ignore_file in (str(dockerfile) + ".dockerignore", os.path.join(self.base, ".dockerignore")):
            if not os.access(ignore_file, os.F_OK):  # no exception object when it is absent (the usual case)
                continue
            real = os.path.realpath(ignore_file)
            if os.path.islink(ignore_file) and not (real == os.path.realpath(self.base) or real.startswith(
                    os.path.realpath(self.base).rstrip("/") + "/")):
                raise ConvertError(f"{os.path.basename(ignore_file)} is a symbolic link leading outside the build "
                                   f"context (to {real}); refusing to read it")
            try:
                with open(ignore_file, encoding="utf-8", errors="replace") as fh:
                    lines = fh.read().splitlines()
                break
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                continue
            except OSError as exc:
                raise ConvertError(f"cannot read {os.path.basename(ignore_file)}: {exc.strerror}") from None
        self.rules = IgnoreRules(lines)
        self.has_rules = bool(self.rules.rules)
        self._walked: dict[str, tuple[list[str], list[str], bool]] = {}
        self._kinds: dict[str, str] = {}
        self._ignored: dict[str, list[str]] = {}

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
                continue
            for e in entries:
                r = f"{rdir}/{e.name}" if rdir else e.name
                is_dir = e.is_dir(follow_symlinks=False)
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


_DECOMPRESS = {"gz": "gzip", "bz2": "bzip2", "xz": "xz", "zst": "zstd"}


def _archive_kind(path: str) -> str:
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


# --------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------

@dataclass(**_SLOTS)
class _Stage:
    index: int
    name: str                      # Apptainer stage name
    alias: str | None              # Docker AS name (lower-case)
    line: int
    header: list[str] = field(default_factory=list)
    files: list[tuple[str | None, str, str]] = field(default_factory=list)   # (from stage, src, dest)
    post: list[str] = field(default_factory=list)
    environment: list[tuple[str, str]] = field(default_factory=list)        # (KEY, rendered "value")
    labels: list[tuple[str, str]] = field(default_factory=list)
    env: dict[str, tuple] = field(default_factory=dict)
    args: dict[str, tuple] = field(default_factory=dict)
    arg_unset: set[str] = field(default_factory=set)
    workdir: str = "/"
    workdir_set: bool = False
    cwd_emitted: str | None = None
    shell: tuple[str, ...] = DEFAULT_SHELL
    cmd: tuple[str, ...] | None = None
    cmd_set: bool = False
    entrypoint: tuple[str, ...] | None = None
    entrypoint_shell: bool = False
    runscript_line: int = 0
    stage_no: int = 0              # staging counter
    uses_cp: bool = False
    uses_mount: bool = False
    uses_as: bool = False
    run_as: str | None = None      # USER (not root): later RUN steps run as this user
    ext_before: list[str] = field(default_factory=list)
    base_ref: str | None = None
    merged_from: str | None = None
    ctx_files: set[str] = field(default_factory=set)
    base_env: dict[str, str] = field(default_factory=dict)   # the base image's own environment, when known
    stopsignal: str | None = None


class _Converter:
    def __init__(self, df: "Dockerfile", context: Path, arch: str, build_args: Mapping[str, str],
                 resolve_base: BaseResolver | None, label: str) -> None:
        self.df = df
        self.ctx_root = context
        self.ctx: BuildContext | None = None
        self.arch = arch
        self.cli_args = dict(build_args)
        self.resolve_base = resolve_base
        self.label = label
        self.notes: list[Note] = []
        self.stages: list[_Stage] = []
        self.ext: dict[str, _Stage] = {}
        self.global_args: dict[str, tuple] = {
            "TARGETPLATFORM": (f"linux/{arch}",), "TARGETOS": ("linux",), "TARGETARCH": (arch,),
            "TARGETVARIANT": ("",), "BUILDPLATFORM": (f"linux/{arch}",), "BUILDOS": ("linux",),
            "BUILDARCH": (arch,), "BUILDVARIANT": ("",),
        }
        self.global_unset: set[str] = set()
        self.used_args: dict[str, str] = {}
        self.context_files: set[str] = set()
        self.base_refs: list[str] = []
        self.cur: _Stage | None = None
        self._wp: WordProcessor | None = None     # the stage's word processor; reset when ARG/ENV change
        self.base_env: dict[str, str] = {}        # environment of the last base resolved (local SIF)

    # -- helpers ----------------------------------------------------------------------
    def note(self, ins: "Instruction | None", construct: str, action: str, reason: str,
             code: str | None = None) -> None:
        if _REF in construct or _REF in reason:  # a base-image variable inside a path: show it as ${NAME}
            construct, reason = construct.replace(_REF, ""), reason.replace(_REF, "")
        self.notes.append(Note(ins.line if ins else 0, construct, action, reason, code))

    def fail(self, ins: "Instruction", msg: str, hint: str | None = None) -> ConvertError:
        return ConvertError(f"{self.label}:{ins.line}: {ins.keyword}: {msg}", hint=hint)

    def context(self) -> BuildContext:
        if self.ctx is None:
            if not os.path.isdir(self.ctx_root):
                raise ConvertError(f"build context {self.ctx_root} is not a folder")
            self.ctx = BuildContext(self.ctx_root, self.df.path)
        return self.ctx

    def words(self, ins: "Instruction", text: str) -> list["Value"]:
        wp = self.processor()
        try:
            out = wp.words(text)
        except ValueError as exc:
            raise self.fail(ins, str(exc)) from None
        self.global_only_note(ins, wp)
        return out

    def processor(self, global_scope: bool = False):
        if global_scope or self.cur is None:
            return WordProcessor(self.global_args, self.df.escape, self.global_unset, closed=True)
        if self._wp is not None:
            return self._wp
        st = self.cur
        known = {**st.args, **st.env} if st.args else st.env
        # a global ARG used in a stage without `ARG NAME` expands to nothing, as in Docker
        self._wp = WordProcessor(known, self.df.escape, _Unset(st.arg_unset, self.global_args))
        return self._wp

    def global_only_note(self, ins: "Instruction", wp: Any) -> None:
        st = self.cur
        for name in dict.fromkeys(wp.unset_used):
            if st is not None and name in self.global_args and name not in st.args and name not in st.env \
                    and name not in st.arg_unset:
                self.note(ins, f"${name}", "translated", f"{name} is a global ARG not declared in this stage, so it "
                          f"expands to nothing, as in Docker (add `ARG {name}` after FROM to use it)", "P02")

    def path_value(self, ins: "Instruction", value: "Value", what: str, shell: bool = False) -> str:
        """A path as text. A variable the base image may define (unknown here) is taken as unset
        for sources; for destinations and WORKDIR (``shell``) it is left to the shell at build and
        run time: the path then holds the reference between two NULs, see :func:`_q`."""
        if has_refs(value):
            names = sorted({s.name for s in value if not isinstance(s, str)})
            if shell:
                self.note(ins, f"{ins.keyword} {what}", "approximated",
                          f"${', $'.join(names)} is not set by this Dockerfile, so Docker would take it from the "
                          "base image's environment; the recipe leaves it to the shell at build and run time "
                          "(the base image's environment plus Apptainer's: HOME is /root during the build and "
                          "the invoking user's home at run time)", "P33")
                return "".join(s if isinstance(s, str) else _REF + render_shell((s,)) + _REF for s in value)
            self.note(ins, f"{ins.keyword} {what}", "approximated",
                      f"${', $'.join(names)} comes from the base image, unknown at conversion time; "
                      "taken as unset", "P05")
        return literal(value)

    def abspath(self, path: str) -> str:
        assert self.cur is not None
        if not path.startswith(("/", _REF)):
            path = posixpath.join(self.cur.workdir, path)
        norm = posixpath.normpath(path)
        return "/" if norm in ("/", "//") else norm.replace("//", "/")

    def emit(self, *lines: str) -> None:
        assert self.cur is not None
        self.cur.post.extend(lines)

    def ensure_cwd(self) -> None:
        st = self.cur
        assert st is not None
        if st.workdir_set and st.cwd_emitted != st.workdir:
            self.emit(f"cd {_q(st.workdir)}")
            st.cwd_emitted = st.workdir

    # -- driver -----------------------------------------------------------------------
    def run(self) -> None:
        if not self.df.instructions:
            raise ConvertError(f"{self.label}: no instructions (empty Dockerfile); it needs a FROM line")
        if "escape" in self.df.directives and self.df.escape != "\\":
            self.note(None, "# escape=`", "translated", "continuation lines use ` as Docker does", "P28")
        for ins in self.df.instructions:
            handler = getattr(self, "do_" + ins.keyword.lower())
            if self.cur is None and ins.keyword not in ("FROM", "ARG"):
                raise self.fail(ins, "comes before the first FROM", hint="every Dockerfile starts with FROM "
                                "(only ARG may come before it)")
            try:
                handler(ins)
            except ValueError as exc:  # quoting/substitution errors from the word processor
                raise self.fail(ins, str(exc)) from None
        if not self.stages:
            raise ConvertError(f"{self.label}: no FROM instruction; a Dockerfile must start from an image")

    # -- FROM -------------------------------------------------------------------------
    def do_from(self, ins: "Instruction") -> None:
        wp = self.processor(global_scope=True)
        try:
            words = wp.words(ins.args)
        except ValueError as exc:
            raise self.fail(ins, str(exc)) from None
        if len(words) not in (1, 3) or (len(words) == 3 and literal(words[1]).lower() != "as"):
            raise self.fail(ins, f"expected 'FROM image [AS name]', got {ins.args[:80]!r}")
        ref = literal(words[0])
        if not ref or has_refs(words[0]) or ref.endswith((":", "/", "@")) or "::" in ref or ref.startswith(":"):
            missing = ", ".join(f"${n}" for n in dict.fromkeys(wp.unknown_used))
            raise self.fail(ins, f"the image reference {ins.args.split()[0]!r} expands to {ref!r}"
                            + (f" ({missing} is not a global ARG)" if missing else ""),
                            hint="declare ARG NAME=value before the first FROM, or pass --build-arg NAME=value")
        if ref != ins.args.split()[0]:
            self.note(ins, "FROM with ARG", "translated", f"image reference resolved at conversion time to {ref}",
                      "P01")
        if _BAD_REF.search(ref):
            raise self.fail(ins, f"the image reference {ref[:80]!r} contains spaces or control characters")
        alias = literal(words[2]).lower() if len(words) == 3 else None
        platform = ins.flag("platform")
        if platform is not None:
            pval = literal(wp.word(platform)) if platform else ""
            same = pval.endswith("/" + self.arch) or not pval
            self.note(ins, "FROM --platform", "translated" if same else "approximated",
                      f"--platform={pval} dropped; the architecture is chosen by hpcexp (--arch {self.arch})"
                      + ("" if same else f", not {pval}"), "P01")
        for fl, _ in ins.flags:
            if fl != "platform":
                self.note(ins, f"FROM --{fl}", "dropped", "unknown FROM option", "P01")
        index = len(self.stages)
        name = alias if alias and _STAGE_NAME_RE.match(alias) else f"stage{index}"
        taken = {s.name for s in self.stages} | set(self.ext)
        while name in taken:
            name += "_"
        parent = self.find_stage(ref.lower()) if "/" not in ref and ":" not in ref else None
        if parent is not None:
            st = copy.copy(parent)
            st.header, st.files, st.post = list(parent.header), list(parent.files), list(parent.post)
            st.environment, st.labels, st.env = list(parent.environment), list(parent.labels), dict(parent.env)
            st.ctx_files, st.ext_before = set(parent.ctx_files), list(parent.ext_before)
            st.index, st.name, st.alias, st.line = index, name, alias, ins.line
            for k in st.args:
                if k not in st.env:
                    st.post.append(f"unset {k}")
            st.args, st.arg_unset, st.cmd_set = {}, set(), False
            st.merged_from = parent.name
            self.note(ins, f"FROM {ref}", "translated",
                      f"Apptainer cannot base a stage on another stage; the steps of stage {parent.name!r} "
                      "are repeated in this one", "P02")
        else:
            st = _Stage(index=index, name=name, alias=alias, line=ins.line)
            self.base_env = {}
            st.header = self.base_header(ins, ref)
            if ref != "scratch":
                st.base_ref = ref
            if self.base_env:
                st.env = {k: (v,) for k, v in self.base_env.items()}
                st.base_env = dict(self.base_env)
                self.note(ins, f"FROM {ref}", "translated", f"the base image's environment is read from the image "
                          f"({len(self.base_env)} variables): $VAR references to it expand as in Docker", "P33")
        if alias is None and index > 0:
            self.note(ins, "FROM (unnamed stage)", "translated", f"stage {index} is named {name!r}", "P02")
        self.stages.append(st)
        self.cur = st
        self._wp = None

    def find_stage(self, ref: str) -> _Stage | None:
        for st in self.stages:
            if st.alias == ref:
                return st
        if ref.isdigit() and int(ref) < len(self.stages):
            return self.stages[int(ref)]
        return None

    def base_header(self, ins: "Instruction | None", ref: str) -> list[str]:
        if ref == "scratch":
            if ins is not None:
                self.note(ins, "FROM scratch", "translated", "Bootstrap: scratch (an empty image)", "P01")
            return ["Bootstrap: scratch"]
        if ref not in self.base_refs:
            self.base_refs.append(ref)
        res = self.resolve_base(ref) if self.resolve_base else None
        self.base_env = dict(res.environment) if res is not None else {}
        if res is None:
            return ["Bootstrap: docker", f"From: {ref}"]
        lines = [f"Bootstrap: {res.bootstrap}"]
        if res.source:
            lines.append(f"From: {res.source}")
        lines.extend(f"{k}: {v}" for k, v in res.headers)
        if ins is not None and res.notes:
            for action, reason in res.notes:
                self.note(ins, f"FROM {ref}", action, reason)
        elif ins is not None:
            self.note(ins, f"FROM {ref}", "translated",
                      f"base image taken from the project's base map: Bootstrap: {res.bootstrap}"
                      + (f", From: {res.source}" if res.source else ""))
        return lines

    # -- ARG --------------------------------------------------------------------------
    def do_arg(self, ins: "Instruction") -> None:
        text = ins.args
        m = _ARG_COMMENT.search(text)
        if m:
            self.note(ins, "ARG with # comment", "approximated",
                      "text after '#' was ignored (Docker has no trailing comments; it would declare more ARGs)",
                      "P12")
            text = text[:m.start()]
        if not text.strip():
            raise self.fail(ins, "needs a name")
        global_scope = self.cur is None
        for tok in _split_unquoted(text):
            name, eq, default = tok.partition("=")
            if not _VAR_NAME.match(name):
                raise self.fail(ins, f"invalid ARG name {name[:40]!r}")
            wp = self.processor(global_scope)
            value: tuple | None
            if name in self.cli_args:
                value = (self.cli_args[name],)
            elif eq:
                try:
                    value = wp.word(default)
                except ValueError as exc:
                    raise self.fail(ins, str(exc)) from None
            elif not global_scope and name in self.global_args:
                value = self.global_args[name]
            else:
                value = None
            if global_scope:
                if value is None:
                    self.global_unset.add(name)
                    self.global_args.pop(name, None)
                else:
                    self.global_args[name] = value
                    self.global_unset.discard(name)
            else:
                st = self.cur
                assert st is not None
                self._wp = None
                if value is None:
                    st.arg_unset.add(name)
                    st.args.pop(name, None)
                else:
                    st.args[name] = value
                    st.arg_unset.discard(name)
                    if name not in st.env:
                        self.emit(f'export {name}="{render_shell(value)}"')
            if value is not None:
                self.used_args[name] = literal(value)

    # -- ENV --------------------------------------------------------------------------
    def env_pairs(self, ins: "Instruction", keyword: str) -> list[tuple[str, str]]:
        """Raw (key, value-text) pairs; spython's parse_env first, our tokenizer when they disagree."""
        text = ins.args
        tokens = _split_unquoted(text)
        first = tokens[0] if tokens else ""
        if "=" not in first:
            # Docker's legacy one-pair form (its parser's "old format"): the key is the text up to
            # the first run of whitespace, the value is ALL the rest of the line, taken as one word
            # (quotes removed, variables expanded, inner spaces kept): `LABEL version = "2.0"` is
            # the label `version` with the value `= 2.0`.
            parts = _LEGACY_SPLIT.split(text.strip(), maxsplit=1)
            if len(parts) < 2 or not parts[1]:
                raise self.fail(ins, f"{parts[0][:40]!r} needs a value (KEY=VALUE, or the legacy KEY VALUE)")
            key, rest = parts
            self.note(ins, f"{keyword} KEY value (legacy form)", "translated",
                      "the whole rest of the line is the value, as in Docker", "P10")
            return [(key, rest)]
        if _SIMPLE_PAIRS.fullmatch(text):
            # plain KEY=VALUE / KEY="quoted value" pairs: spython's parse_env splits these right
            spy = _spython_mod()
            theirs = _spython(self.label, ins.line, keyword, spy["parser"].parse_env, text)
            return [tuple(item.split("=", 1)) for item in theirs]  # type: ignore[misc]
        # escapes, quoted keys, quotes inside words: spython splits these wrongly or crashes (P10, P26)
        try:
            return split_key_values(text, self.df.escape)
        except ValueError as exc:
            raise self.fail(ins, str(exc)) from None

    def do_env(self, ins: "Instruction") -> None:
        st = self.cur
        assert st is not None
        pairs = self.env_pairs(ins, "ENV")
        # Docker expands every value of one ENV line against the environment from BEFORE the
        # line: `ENV A=2 B=$A` gives B the previous A, not 2
        wp = self.processor()
        values = []
        for key, raw in pairs:
            if not _VAR_NAME.match(key):
                raise self.fail(ins, f"invalid variable name {key[:40]!r}")
            try:
                values.append((key, wp.word(raw)))
            except ValueError as exc:
                raise self.fail(ins, str(exc)) from None
            self.global_only_note(ins, wp)
        if len(pairs) > 1 and _refers_to_each_other(pairs):
            self.note(ins, "ENV with several pairs", "translated", "each value refers to the variables as they "
                      "were before this line, as in Docker", "P11")
        together = False
        if len(values) > 1:
            keys = {k for k, _ in values}
            together = any(isinstance(seg, dfmod.Ref) and seg.name in keys for _, v in values for seg in v)
        for key, value in values:
            st.env[key] = value
            self._wp = None
            shown = render_shell(value)
            if not together:
                self.emit(f'export {key}="{shown}"')
                st.environment.append((key, shown))
        if together:  # one export: the shell expands all its words before assigning any (Docker's rule)
            self.emit("export " + " ".join(f'{k}="{render_shell(v)}"' for k, v in values))
            # %environment is one export per line: a variable is set only after every value that
            # refers to its previous value (`A=2 B=$A`: B first)
            st.environment.extend((k, render_shell(v)) for k, v in _referrers_first(values))

    # -- LABEL / MAINTAINER -----------------------------------------------------------
    def do_label(self, ins: "Instruction") -> None:
        st = self.cur
        assert st is not None
        for key, raw in self.env_pairs(ins, "LABEL"):
            wp = self.processor()
            try:
                k = literal(wp.word(key))
                v = literal(wp.word(raw))
            except ValueError as exc:
                raise self.fail(ins, str(exc)) from None
            clean_k = _SPACES.sub("_", k)
            if clean_k != k:
                self.note(ins, "LABEL", "approximated", f"label name {k!r} written as {clean_k!r} "
                          "(Apptainer label names end at the first space)", "P26")
            st.labels.append((clean_k, " ".join(v.split())))

    def do_maintainer(self, ins: "Instruction") -> None:
        assert self.cur is not None
        self.cur.labels.append(("maintainer", " ".join(ins.args.split())))
        self.note(ins, "MAINTAINER", "translated", "written as the label 'maintainer'")

    # -- RUN --------------------------------------------------------------------------
    def shell_command(self, text: str) -> list[str]:
        """Lines running ``text`` like Docker's ``SHELL + [text]`` (default: sh -c, no -e)."""
        st = self.cur
        assert st is not None
        if st.run_as is not None:  # USER: a process of its own, switched to that user
            return [f"_hpcexp_as {_q(st.run_as)} {shlex.join([*st.shell, text.rstrip(chr(10))])}"]
        if st.shell == DEFAULT_SHELL:
            return ["(", "set +e", text.rstrip("\n"), ")"]
        return [shlex.join([*st.shell, text])]

    def do_run(self, ins: "Instruction") -> None:
        st = self.cur
        assert st is not None
        before: list[str] = []
        after: list[str] = []
        for fl, val in ins.flags:
            if fl == "mount":
                b, a = self.run_mount(ins, val or "")
                before += b
                after += a
            elif fl == "network":
                self.note(ins, f"RUN --network={val}", "dropped",
                          "Apptainer builds use the host network; the step runs with network access")
            elif fl == "security":
                self.note(ins, f"RUN --security={val}", "dropped", "not available in Apptainer builds")
            else:
                self.note(ins, f"RUN --{fl}", "dropped", "unknown RUN option")
        if ins.exec_form is not None:
            if not ins.exec_form:
                raise self.fail(ins, "the exec form [] is empty")
            body = [shlex.join(ins.exec_form)]
            if st.run_as is not None:
                body = [f"_hpcexp_as {_q(st.run_as)} {body[0]}"]
            self.note(ins, "RUN [exec form]", "translated", "the argument list is run without a shell, "
                      "each argument quoted", "P23")
        elif ins.heredocs:
            cmd = ins.args
            hd = ins.heredocs
            only = re.fullmatch(r"\s*<<-?(['\"]?)" + re.escape(hd[0].name) + r"\1\s*", cmd)
            if only and len(hd) == 1:
                script = hd[0].body
                if script.startswith("#!"):
                    interp = script.split("\n", 1)[0][2:].strip()
                    st.stage_no += 1
                    path = f"{STAGING}/run/{st.stage_no}"
                    marker = heredoc_marker(script)
                    body = [f"mkdir -p {STAGING}/run", f"cat > {path} <<'{marker}'",
                            script.rstrip("\n"), marker, f"chmod +x {path}",
                            *self.shell_command(f"{interp} {path}")]
                else:
                    body = self.shell_command(script)
            else:
                text = cmd + "\n" + "".join(h.body + h.name + "\n" for h in hd)
                body = self.shell_command(text)
            self.note(ins, "RUN <<heredoc", "translated", "the here-document body is run as the step's script",
                      "P20")
        else:
            if not ins.args.strip():
                raise self.fail(ins, "has no command")
            body = self.shell_command(ins.args)
        self.ensure_cwd()
        self.emit(f"# Dockerfile line {ins.line}: RUN", *before, *body, *after)

    def run_mount(self, ins: "Instruction", spec: str) -> tuple[list[str], list[str]]:
        opts: dict[str, str] = {}
        for part in spec.split(","):
            k, _, v = part.partition("=")
            opts[k.strip().lower()] = v.strip()
        kind = opts.get("type", "bind")
        target = opts.get("target") or opts.get("dst") or opts.get("destination") or ""
        if kind in ("cache", "tmpfs"):
            if not target:
                raise self.fail(ins, f"--mount={spec}: a {kind} mount needs target=")
            tgt = self.abspath(target)
            st = self.cur
            assert st is not None
            st.uses_mount = True
            hid = f"m{ins.line}.{len(st.post)}"   # its own id: the staging numbers stay as they were
            what = "a build cache" if kind == "cache" else "a tmpfs"
            self.note(ins, f"RUN --mount=type={kind}", "approximated",
                      f"{tgt} is an empty folder for this step (Docker: {what}, kept out of the image); what the step "
                      "writes there is removed after it and the image's own files there are put back, so it stays "
                      "out of the image" + (", but nothing is reused between builds" if kind == "cache" else ""), "P21")
            return [f"_hpcexp_hide {_q(tgt)} {hid}"], [f"_hpcexp_unhide {_q(tgt)} {hid}"]
        if kind in ("secret", "ssh"):
            sid = opts.get("id") or opts.get("target") or "default"
            self.note(ins, f"RUN --mount=type={kind}", "dropped",
                      f"{kind} {sid!r} is not available in an Apptainer build; the step runs without it "
                      "(pass it another way, e.g. a bind at run time)", "P21")
            return [], []
        if kind != "bind":
            self.note(ins, f"RUN --mount=type={kind}", "dropped", "unknown mount type", "P21")
            return [], []
        if not target:
            raise self.fail(ins, f"--mount={spec}: a bind mount needs target=")
        src = opts.get("source") or opts.get("src") or "."
        tgt = self.abspath(target)
        st = self.cur
        assert st is not None
        st.stage_no += 1
        n = st.stage_no
        stage_from = opts.get("from")
        lines: list[str] = []
        if stage_from:
            frm = self.from_stage(ins, stage_from)
            staged = f"{STAGING}/from/{n}/0/{_basename(src)}"
            st.files.append((frm, posixpath.normpath("/" + src), staged))
        else:
            rels = self.context_sources(ins, src)
            if len(rels) != 1:
                raise self.fail(ins, f"--mount source {src!r} must be one file or folder")
            staged = self.stage_context(rels[0], n, 0)
        st.uses_cp = True
        st.uses_mount = True
        lines.append(f"_hpcexp_hide {_q(tgt)} {n}")
        lines.append(f"rmdir {_q(tgt)} && _hpcexp_cp {shlex.quote(staged)} {_q(tgt)} file")
        self.note(ins, "RUN --mount=type=bind", "translated",
                  f"{src} is copied to {tgt} for this step and removed after it (what was there is put back)", "P21")
        return lines, [f"_hpcexp_unhide {_q(tgt)} {n}"]

    # -- COPY / ADD -------------------------------------------------------------------
    def from_stage(self, ins: "Instruction", ref: str) -> str:
        val = literal(self.processor().word(ref))
        st = self.find_stage(val.lower())
        if st is not None:
            if st is self.cur:
                raise self.fail(ins, f"--from={val} refers to the stage being built")
            return st.name
        if val.isdigit():
            raise self.fail(ins, f"--from={val}: there is no stage {val} before this one")
        ext = self.ext.get(val)
        if ext is None:
            name = f"ext{len(self.ext)}"
            ext = _Stage(index=-1, name=name, alias=None, line=ins.line)
            ext.header = self.base_header(ins, val)
            ext.base_ref = val
            self.ext[val] = ext
            self.note(ins, f"COPY --from={val}", "translated", f"the image is added as stage {name!r}", "P03")
        assert self.cur is not None
        if ext.name not in self.cur.ext_before:
            self.cur.ext_before.append(ext.name)
        return ext.name

    def context_sources(self, ins: "Instruction", src: str, allow_empty: bool = False) -> list[str]:
        norm = posixpath.normpath(src.replace("\\", "/") if self.df.escape == "`" else src).lstrip("/")
        if norm in (".", ""):
            norm = ""
        if norm == ".." or norm.startswith("../"):
            raise self.fail(ins, f"source {src!r} is outside the build context")
        ctx = self.context()
        found = ctx.match(norm)
        if not found and allow_empty and any(ch in norm for ch in "*?["):
            # BuildKit: a source wildcard that matches nothing is nothing to copy (the "copy if
            # present" idiom, `COPY cwallet.ss[o] ./`); a literal path that is missing is an error
            self.note(ins, f"{ins.keyword} {src}", "translated", "the wildcard matches nothing in the build "
                      "context, so nothing is copied (as BuildKit does)", "P32")
            return []
        if not found:
            raise self.fail(ins, f"source {src!r} not found in the build context {self.ctx_root.name}/"
                            + (" (or excluded by .dockerignore)" if ctx.has_rules else ""))
        return found

    def stage_context(self, rel: str, n: int, k: int, exclude: "IgnoreRules | None" = None) -> str:
        """Add %files lines staging context path ``rel``; return the staged path."""
        st = self.cur
        assert st is not None
        ctx = self.context()
        base = _basename(rel) if rel else "_context"
        staged = f"{STAGING}/ctx/{n}/{k}/{base}"
        if ctx.is_dir(rel):
            members = ctx.under(rel)
            dropped: list[str] = []
            if exclude is not None:  # COPY --exclude: patterns match paths inside the copied folder
                kept = []
                for f in members:
                    inner = f[len(rel) + 1:] if rel else f
                    (dropped if exclude.ignored(inner) else kept).append(f)
                members = kept
            st.ctx_files.update(members)
            filtered = ctx.filtered(rel) or bool(dropped)
            if filtered and all(_SAFE_SRC.fullmatch(f) for f in members):
                for f in members:
                    inner = f[len(rel) + 1:] if rel else f
                    st.files.append((None, f, f"{staged}/{inner}"))
                if not members:
                    st.post.append(f"mkdir -p {shlex.quote(staged)}")
            else:
                st.files.append((None, rel or ".", staged))
                # names %files cannot carry one by one: stage the folder, drop the ignored part in %post
                gone = (ctx.ignored_paths(rel) if ctx.filtered(rel) else []) + dropped
                for path in gone:
                    inner = path[len(rel) + 1:] if rel else path
                    st.post.append(f"rm -rf {shlex.quote(staged + '/' + inner)}")
        else:
            st.ctx_files.add(rel)
            st.files.append((None, rel, staged))
        return staged

    def do_copy(self, ins: "Instruction") -> None:
        self.copy_or_add(ins, add=False)

    def do_add(self, ins: "Instruction") -> None:
        self.copy_or_add(ins, add=True)

    def copy_or_add(self, ins: "Instruction", add: bool) -> None:
        st = self.cur
        assert st is not None
        kw = ins.keyword
        chmod = None
        chown = None
        frm = None
        parents = False
        excludes: list[str] = []
        for fl, val in ins.flags:
            if fl == "chown":
                chown = self.path_value(ins, self.processor().word(val or ""), "--chown", shell=True)
                if _REF not in chown and not _CHOWN.fullmatch(chown):
                    raise self.fail(ins, f"--chown={chown!r} is not USER, USER:GROUP or UID:GID")
                self.note(ins, f"{kw} --chown={chown}", "translated", "the copied files get this owner in the image "
                          "(chown during the build); the container still runs as whoever starts it", "P04")
            elif fl == "chmod":
                chmod = val or ""
                if not _CHMOD.fullmatch(chmod):
                    raise self.fail(ins, f"--chmod={chmod!r} is not a mode")
            elif fl == "from":
                frm = self.from_stage(ins, val or "")
            elif fl == "link":
                self.note(ins, f"{kw} --link", "translated", "layer linking has no meaning in a SIF; ignored", "P04")
            elif fl == "exclude":
                excludes.append(val or "")
            elif fl == "parents":
                parents = True
                self.note(ins, f"{kw} --parents", "translated", "each source keeps its path under the destination, "
                          "as BuildKit does", "P04")
            elif fl in ("checksum", "keep-git-dir"):
                self.note(ins, f"{kw} --{fl}", "dropped", "not checked by Apptainer", "P04")
            else:
                self.note(ins, f"{kw} --{fl}", "dropped", f"unknown {kw} option", "P04")
        if excludes:
            self.note(ins, f"{kw} --exclude", "translated" if frm is None else "approximated",
                      f"--exclude {' '.join(excludes)}: matching files are left out"
                      + ("" if frm is None else " (matched by name in the copied folder; ** is read as any depth)"),
                      "P31")
        if ins.heredocs and ins.exec_form is None:
            self.copy_heredoc(ins, chmod, chown)
            return
        if ins.exec_form is not None:
            self.note(ins, f"{kw} [JSON form]", "translated", "sources and destination read as a JSON list", "P07")
            words = []
            for w in ins.exec_form:
                v = self.processor().word(w.replace("\\", "\\\\").replace('"', '\\"').replace("'", "\\'"))
                words.append(v)
        else:
            words = self.words(ins, ins.args)
        if len(words) < 2:
            raise self.fail(ins, "needs at least one source and a destination")
        dest_raw = self.path_value(ins, words[-1], "destination", shell=True)
        srcs = [self.path_value(ins, w, "source") for w in words[:-1]]
        dest_is_dir = dest_raw.endswith("/") or dest_raw in (".", "") or len(srcs) > 1
        dest = self.abspath(dest_raw or ".")
        if not dest_raw.startswith(("/", _REF)):
            if st.workdir_set:
                self.note(ins, f"{kw} to {dest_raw}", "translated", f"relative destination resolved against "
                          f"WORKDIR to {dest}", "P05")
        st.stage_no += 1
        n = st.stage_no
        lines = [f"# Dockerfile line {ins.line}: {kw}"]
        staged_all: list[str] = []
        exclude = IgnoreRules(excludes) if excludes else None
        for k, src in enumerate(srcs):
            if add and _URL.match(src):
                lines += self.add_url(ins, src, dest, dest_is_dir)
                continue
            if frm is not None:
                path = posixpath.normpath("/" + src) if not src.startswith("/") else posixpath.normpath(src)
                if any(ch in path for ch in "*?["):
                    staged_dir = f"{STAGING}/from/{n}/{k}"
                    st.files.append((frm, path, staged_dir + "/"))
                    staged_all.append(staged_dir)
                    self.note(ins, f"{kw} --from with wildcard", "approximated",
                              "matches are copied into the destination folder", "P03")
                    lines += self.exclude_lines(ins, staged_dir, excludes)
                    lines.append(f"mkdir -p {_q(dest)} && cp -a {staged_dir}/. {_q(dest)}/")
                    continue
                staged = f"{STAGING}/from/{n}/{k}/{_basename(path)}"
                st.files.append((frm, path, staged))
                staged_all.append(staged)
                st.uses_cp = True
                lines += self.exclude_lines(ins, staged, excludes)
                if parents:
                    target = self.parents_dest(dest, src.lstrip("/"))
                    lines.append(f"_hpcexp_cp {shlex.quote(staged)} {_q(target)} file")
                else:
                    lines.append(f"_hpcexp_cp {shlex.quote(staged)} {_q(dest)} {'dir' if dest_is_dir else 'file'}")
                continue
            rels = self.context_sources(ins, src, allow_empty=True)
            if exclude is not None:
                rels = [r for r in rels if not (exclude.ignored(r) or exclude.ignored(_basename(r)))]
            many = dest_is_dir or len(rels) > 1
            for j, rel in enumerate(rels):
                kk = f"{k}" if len(rels) == 1 else f"{k}.{j}"
                ctx = self.context()
                kind = _archive_kind(os.path.join(self.ctx_root, rel)) if add and not ctx.is_dir(rel) else ""
                if kind:
                    staged = self.stage_context(rel, n, kk)  # type: ignore[arg-type]
                    if kind == "tar":
                        unpack = f"tar -xf {shlex.quote(staged)} -C {_q(dest)}"
                    else:  # a pipe works with every tar, busybox's included (no -z/-j/-J needed)
                        unpack = f"{_DECOMPRESS[kind]} -dc {shlex.quote(staged)} | tar -xf - -C {_q(dest)}"
                    lines.append(f"mkdir -p {_q(dest)} && {unpack}")
                    self.note(ins, f"ADD {rel}", "translated", f"the archive is extracted into {dest}", "P08")
                    continue
                staged = self.stage_context(rel, n, kk, exclude)  # type: ignore[arg-type]
                staged_all.append(staged)
                st.uses_cp = True
                if parents:
                    target = self.parents_dest(dest, rel, src)
                    lines.append(f"_hpcexp_cp {shlex.quote(staged)} {_q(target)} file")
                else:
                    lines.append(f"_hpcexp_cp {shlex.quote(staged)} {_q(dest)} {'dir' if many else 'file'}")
        if chmod or chown:
            # mode and owner are set on the staged copy, before it is copied into place (cp -a keeps
            # them): only the files this instruction copies change, never what the destination held
            fix = []
            for p in dict.fromkeys(staged_all):
                if chmod:
                    fix.append(f"chmod -R {shlex.quote(chmod)} {shlex.quote(p)}")
                if chown:
                    fix.append(_chown_line(chown, shlex.quote(p)))
            lines[1:1] = fix
        if chmod:
            self.note(ins, f"{kw} --chmod", "translated", f"mode {chmod} set on the copied files", "P04")
        self.emit(*lines)

    def parents_dest(self, dest: str, rel: str, src: str | None = None) -> str:
        """COPY --parents: the source's path is kept under the destination (after a ``/./`` marker
        only the part after it, as BuildKit does)."""
        keep = rel
        if src is not None and "/./" in "/" + src:
            marker = posixpath.normpath(("/" + src).rsplit("/./", 1)[0]).lstrip("/")
            if marker and rel.startswith(marker + "/"):
                keep = rel[len(marker) + 1:]
        return posixpath.join(dest, keep) if keep else dest

    def exclude_lines(self, ins: "Instruction", staged: str, excludes: list[str]) -> list[str]:
        """--exclude for a copy from another stage: the staged copy is pruned in %post."""
        out = []
        for pat in excludes:
            if not _GLOB_FILES.fullmatch(pat) or ".." in pat.split("/"):
                raise self.fail(ins, f"--exclude={pat!r}: only plain names and * ? [ ] wildcards are supported")
            sh = pat.replace("**/", "").strip("/")
            out.append(f'find {shlex.quote(staged)} -mindepth 1 \\( -path {shlex.quote(staged + "/" + sh)} -o -name '
                       f'{shlex.quote(sh)} \\) -exec rm -rf {{}} + 2>/dev/null || true')
        return out

    def copy_heredoc(self, ins: "Instruction", chmod: str | None, chown: str | None = None) -> None:
        words = self.words(ins, ins.args)
        dest_raw = self.path_value(ins, words[-1], "destination", shell=True)
        dest = self.abspath(dest_raw)
        dest_is_dir = dest_raw.endswith("/") or len(ins.heredocs) > 1
        lines = [f"# Dockerfile line {ins.line}: {ins.keyword} <<heredoc"]
        for hd in ins.heredocs:
            target = posixpath.join(dest, hd.name) if dest_is_dir else dest
            body = hd.body
            if not hd.quoted and "$" in body:
                # Docker expands ARG/ENV in an unquoted COPY heredoc at build time; so do we, now
                wp = self.processor()
                try:
                    value = wp.expand(body)
                except ValueError as exc:
                    raise self.fail(ins, f"<<{hd.name}: {exc}") from None
                if has_refs(value):
                    names = sorted({s.name for s in value if not isinstance(s, str)})
                    self.note(ins, f"{ins.keyword} <<{hd.name}", "approximated",
                              f"${', $'.join(names)} comes from the base image, unknown at conversion time; "
                              "taken as unset", "P20")
                body = literal(value)
            marker = heredoc_marker(body)
            lines += [f"mkdir -p {_q(posixpath.dirname(target) or '/')}",
                      f"cat > {_q(target)} <<'{marker}'", body.rstrip("\n"), marker]
            # Docker writes a heredoc file with mode 0644 (or --chmod), whatever the build's umask
            lines.append(f"chmod {shlex.quote(chmod or '644')} {_q(target)}")
            if chown:
                lines.append(_chown_line(chown, _q(target)))
        self.note(ins, f"{ins.keyword} <<heredoc", "translated", f"written to {dest} in %post", "P20")
        self.emit(*lines)

    def add_url(self, ins: "Instruction", url: str, dest: str, dest_is_dir: bool) -> list[str]:
        if url.startswith("git") or ".git" in url.split("#")[0][-5:] or url.startswith("git@"):
            repo, _, ref = url.partition("#")
            argv = ["git", "clone", "--depth", "1"] + (["--branch", ref] if ref else []) + [repo, dest]  # dest: _q
            self.note(ins, f"ADD {url}", "approximated", "cloned with git during %post: the image needs git "
                      "and the build needs network access", "P08")
            return [f"mkdir -p {_q(posixpath.dirname(dest))}", f"{shlex.join(argv[:-1])} {_q(dest)}"]
        name = _basename(url.split("?")[0].split("#")[0]) or "download"
        target = posixpath.join(dest, name) if dest_is_dir else dest
        q = _q(target)
        u = shlex.quote(url)
        self.note(ins, f"ADD {url}", "approximated", "downloaded during %post with curl or wget: the image needs "
                  "one of them and the build needs network access (or download it into the context and COPY it)",
                  "P08")
        return [f"mkdir -p {_q(posixpath.dirname(target))}",
                f"if command -v curl >/dev/null 2>&1; then curl -fsSL -o {q} {u}; "
                f"else wget -q -O {q} {u}; fi"]

    # -- WORKDIR / USER / SHELL / VOLUME ... ------------------------------------------
    def do_workdir(self, ins: "Instruction") -> None:
        st = self.cur
        assert st is not None
        words = self.words(ins, ins.args)
        if len(words) != 1:
            raise self.fail(ins, "expects one path")
        raw = self.path_value(ins, words[0], "path", shell=True)
        if not raw:
            raise self.fail(ins, "expands to an empty path")
        st.workdir = self.abspath(raw)
        st.workdir_set = True
        if not raw.startswith(("/", _REF)) or (_REF not in raw and raw != ins.args.strip()):
            self.note(ins, "WORKDIR", "translated", f"resolved to the absolute path {st.workdir}", "P14")
        self.emit(f"mkdir -p {_q(st.workdir)}")

    def do_user(self, ins: "Instruction") -> None:
        st = self.cur
        assert st is not None
        words = self.words(ins, ins.args) if ins.args.strip() else []
        if len(words) != 1:
            raise self.fail(ins, "expects one user, e.g. USER app or USER 1000:1000")
        user = self.path_value(ins, words[0], "user", shell=True)
        shown = user.replace(_REF, "")
        if user.split(":")[0] in ("root", "0"):
            st.run_as = None
            self.note(ins, f"USER {shown}", "translated", "later RUN steps run as root, as in Docker")
            return
        st.run_as = user
        st.uses_as = True
        self.note(ins, f"USER {shown}", "approximated",
                  f"later RUN steps run as {shown} during the build, as in Docker, when the build can switch "
                  "users (setpriv in the image and subordinate ids for the build; otherwise as root, with a "
                  "warning in the build log); the container itself runs as whoever starts it", "P13")

    def do_shell(self, ins: "Instruction") -> None:
        st = self.cur
        assert st is not None
        if not ins.exec_form:
            raise self.fail(ins, 'must be a JSON list, e.g. SHELL ["/bin/bash", "-c"]')
        st.shell = tuple(ins.exec_form)
        self.note(ins, "SHELL " + " ".join(ins.exec_form), "translated",
                  "later RUN steps and shell-form CMD/ENTRYPOINT run through this shell", "P19")

    def do_volume(self, ins: "Instruction") -> None:
        paths = list(ins.exec_form) if ins.exec_form is not None else [literal(w) for w in self.words(ins, ins.args)]
        for p in paths:
            ap = self.abspath(p)
            self.emit(f"mkdir -p {_q(ap)}")
            self.note(ins, f"VOLUME {ap}", "approximated", "the folder is created, but the image is read-only: "
                      "bind a host folder there (binds:) or run with --writable-tmpfs", "P27")

    def do_expose(self, ins: "Instruction") -> None:
        self.note(ins, f"EXPOSE {ins.args.strip()}", "dropped",
                  "Apptainer shares the host network; ports need no exposing", "P27")

    def do_stopsignal(self, ins: "Instruction") -> None:
        st = self.cur
        assert st is not None
        raw = literal(self.processor().word(ins.args.strip())) if ins.args.strip() else ""
        name = _signal_name(raw)
        if name is None:
            raise self.fail(ins, f"{raw[:40]!r} is not a signal (use a name like SIGINT, or a number)")
        st.stopsignal = name
        self.note(ins, f"STOPSIGNAL {raw}", "translated", "Apptainer has no stop signal setting; it is recorded in "
                  f"the fidelity report and the image's sidecar, and `hpcexp stop` of a local run sends {name} "
                  "first (then SIGKILL after the grace period), as `docker stop` does", "P27")

    def do_healthcheck(self, ins: "Instruction") -> None:
        if ins.args.strip().upper() == "NONE":
            self.note(ins, "HEALTHCHECK NONE", "translated", "nothing to do")
            return
        self.note(ins, "HEALTHCHECK", "dropped", "Apptainer has no health checks and %test runs at build time, "
                  "where a service probe would fail", "P24")

    def do_onbuild(self, ins: "Instruction") -> None:
        self.note(ins, "ONBUILD", "dropped", "Apptainer images have no build triggers", "P25")

    # -- CMD / ENTRYPOINT -------------------------------------------------------------
    def do_cmd(self, ins: "Instruction") -> None:
        st = self.cur
        assert st is not None
        st.cmd = self.command_value(ins)
        st.cmd_set = True
        st.runscript_line = ins.line

    def do_entrypoint(self, ins: "Instruction") -> None:
        st = self.cur
        assert st is not None
        value = self.command_value(ins)
        st.entrypoint = value or None
        st.entrypoint_shell = ins.exec_form is None and bool(value)
        if not st.cmd_set:
            st.cmd = None
        st.runscript_line = ins.line
        if ins.exec_form is None and value:
            self.note(ins, "ENTRYPOINT (shell form)", "translated",
                      "runs through the shell; CMD and run arguments are ignored, as in Docker", "P17")

    def command_value(self, ins: "Instruction") -> tuple[str, ...]:
        st = self.cur
        assert st is not None
        if ins.exec_form is not None:
            return tuple(ins.exec_form)
        text = ins.args.strip()
        if not text:
            return ()
        return (*st.shell, text)

    def runscript(self, st: _Stage) -> list[str] | None:
        ep, cmd = st.entrypoint, st.cmd or None
        if not ep and not cmd:
            return None
        lines = []
        if st.workdir_set:
            lines.append(f"cd {_q(st.workdir)}")
        if ep and st.entrypoint_shell:
            lines.append(f"exec {shlex.join(ep)}")  # Docker: CMD and run arguments never reach it
        elif ep:
            if cmd:
                lines += ['if [ "$#" -gt 0 ]; then', f'    exec {shlex.join(ep)} "$@"', "else",
                          f"    exec {shlex.join([*ep, *cmd])}", "fi"]
            else:
                lines.append(f'exec {shlex.join(ep)} "$@"')
        else:
            assert cmd is not None
            lines += ['if [ "$#" -gt 0 ]; then', '    exec "$@"', "else", f"    exec {shlex.join(cmd)}", "fi"]
        return lines

    # -- rendering --------------------------------------------------------------------
    def prune(self) -> None:
        """Keep the stages the final image needs (as BuildKit does): Apptainer builds every stage
        it is given, and a stage merged into its child or never copied from is wasted work."""
        needed = {self.stages[-1].name}
        by_name = {s.name: s for s in self.stages}
        todo = [self.stages[-1]]
        while todo:
            st = todo.pop()
            for frm, _, _ in st.files:
                if frm in by_name and frm not in needed:
                    needed.add(frm)
                    todo.append(by_name[frm])
        for st in self.stages:
            if st.name not in needed:
                self.notes.append(Note(st.line, f"stage {st.name}", "translated",
                                       "not used by the final image, so it is left out (Docker BuildKit skips "
                                       "it too)", "P02"))
        self.stages = [s for s in self.stages if s.name in needed]
        ext_by_name = {e.name: e for e in self.ext.values()}
        refs: list[str] = []
        for st in self.stages:
            for name in st.ext_before:
                ref = ext_by_name[name].base_ref
                if ref and ref not in refs:
                    refs.append(ref)
            if st.base_ref and st.base_ref not in refs:
                refs.append(st.base_ref)
            self.context_files.update(st.ctx_files)
        self.base_refs = refs

    def render(self, sha: str) -> str:
        spy = _spython_mod()
        writer = spy["writer"]
        out = [f"# Generated by hpcexp {__version__} from {self.label} (sha256 {sha}) for {self.arch}.",
               "# Do not edit: change the Dockerfile and run `hpcexp convert` again.",
               "# %files sources are relative to the build context: build from that folder."]
        multi = len(self.stages) > 1 or bool(self.ext)
        emitted_ext: set[str] = set()
        ext_by_name = {e.name: e for e in self.ext.values()}
        last = self.stages[-1]
        for st in self.stages:
            for name in st.ext_before:
                if name in emitted_ext:
                    continue
                emitted_ext.add(name)
                out.append("")
                out.extend(ext_by_name[name].header)
                out.append(f"Stage: {name}")
            out.append("")
            out.extend(st.header)
            if multi:
                out.append(f"Stage: {st.name}")
            groups: dict[str | None, list[tuple[str, str]]] = {}
            for frm, src, dst in st.files:
                groups.setdefault(frm, []).append((_files_src(self.label, src, glob=frm is not None),
                                                   _files_dest(dst)))
            for frm, pairs in groups.items():
                out.append("")
                out.extend(_spython(self.label, st.line, "%files", writer.create_keyval_section, pairs, "files",
                                    frm))
            if st.labels:
                out.append("")
                out.extend(_spython(self.label, st.line, "%labels", writer.create_keyval_section,
                                    [(k, v) for k, v in st.labels], "labels", None))
            if st.environment:
                out.append("")
                out.extend(_spython(self.label, st.line, "%environment", writer.create_env_section,
                                    [f'{k}="{v}"' for k, v in st.environment], "environment"))
            post = list(st.post)
            if st.uses_mount:
                post.insert(0, _MOUNT_FUNC)
            if st.uses_as:
                post.insert(0, _AS_FUNC)
            if st.uses_cp:
                post.insert(0, _CP_FUNC)
            if st.files or any(STAGING in p for p in post):
                post.append(f"rm -rf {STAGING}")
            if post:
                out.append("")
                out.append("%post")
                out.extend(post)
            if st is last:
                rs = self.runscript(st)
                if rs is not None:
                    out.append("")
                    out.append("%runscript")
                    out.extend(rs)
        return "\n".join(out) + "\n"

    def finish_notes(self) -> None:
        last = self.stages[-1]
        line = last.runscript_line
        if last.entrypoint or last.cmd:
            if last.entrypoint and last.entrypoint_shell:
                pass  # the P17 note at the ENTRYPOINT line says it all
            elif last.entrypoint and last.cmd:
                self.notes.append(Note(line, "ENTRYPOINT + CMD", "translated", "%runscript runs ENTRYPOINT with "
                                       "CMD as default arguments; run arguments replace CMD (Docker's rule)", "P16"))
            elif last.cmd:
                self.notes.append(Note(line, "CMD", "translated", "%runscript runs CMD; run arguments replace it "
                                       "(Docker's rule; a base image ENTRYPOINT is not applied)", "P15"))
            else:
                self.notes.append(Note(line, "ENTRYPOINT", "translated",
                                       "%runscript runs ENTRYPOINT with the run arguments appended", "P16"))
        else:
            self.notes.append(Note(0, "no CMD/ENTRYPOINT", "translated",
                                   "no %runscript is written, so the base image's own runscript applies", "P18"))


class _Unset:
    """Names that expand to nothing in a stage: declared ARGs without value, and global ARGs."""

    __slots__ = ("a", "b")

    def __init__(self, a: set[str], b: dict[str, tuple]) -> None:
        self.a, self.b = a, b

    def __contains__(self, name: object) -> bool:
        return name in self.a or name in self.b


def _split_unquoted(text: str) -> list[str]:
    if "'" not in text and '"' not in text:
        return text.split()
    out, cur, quote = [], [], None
    for c in text:
        if quote:
            cur.append(c)
            if c == quote:
                quote = None
        elif c in "'\"":
            quote = c
            cur.append(c)
        elif c in " \t":
            if cur:
                out.append("".join(cur))
                cur = []
        else:
            cur.append(c)
    if cur:
        out.append("".join(cur))
    return out


_SIGNALS = {"HUP": 1, "INT": 2, "QUIT": 3, "ILL": 4, "TRAP": 5, "ABRT": 6, "BUS": 7, "FPE": 8, "KILL": 9,
            "USR1": 10, "SEGV": 11, "USR2": 12, "PIPE": 13, "ALRM": 14, "TERM": 15, "STKFLT": 16, "CHLD": 17,
            "CONT": 18, "STOP": 19, "TSTP": 20, "TTIN": 21, "TTOU": 22, "URG": 23, "XCPU": 24, "XFSZ": 25,
            "VTALRM": 26, "PROF": 27, "WINCH": 28, "IO": 29, "PWR": 30, "SYS": 31}


def _signal_name(text: str) -> str | None:
    """``SIGINT``/``INT``/``2`` -> ``SIGINT`` (Linux numbering, as Docker's signal.ParseSignal); else None."""
    t = text.strip().upper()
    if t.isdigit():
        n = int(t)
        return next((f"SIG{k}" for k, v in _SIGNALS.items() if v == n), None)
    t = t.removeprefix("SIG")
    return f"SIG{t}" if t in _SIGNALS else None


def _chown_line(owner: str, quoted_path: str) -> str:
    """chown at build time; a fakeroot build without a subordinate id range cannot give files to
    other ids, and then the files stay root's (said on the build log, not fatal)."""
    shown = owner.replace(_REF, "").replace("'", "")
    return (f"chown -R {_q(owner)} {quoted_path} 2>/dev/null || echo 'hpcexp: warning: could not chown "
            f"{shown} (unknown user or group, or no subordinate ids for this build)' >&2")


def _referrers_first(values: list[tuple[str, "Value"]]) -> list[tuple[str, "Value"]]:
    """Order ``values`` so that each key comes after the values referring to it (cycles keep line order)."""
    todo = list(values)
    out: list[tuple[str, Value]] = []
    while todo:
        for i, (key, _) in enumerate(todo):
            if not any(isinstance(seg, dfmod.Ref) and seg.name == key for k, v in todo if k != key for seg in v):
                out.append(todo.pop(i))
                break
        else:
            out.extend(todo)
            break
    return out


def _refers_to_each_other(pairs: list[tuple[str, str]]) -> bool:
    """Does a value of ``K1=V1 K2=V2`` name one of the line's own keys ($K or ${K})?"""
    raws = [raw for _, raw in pairs if "$" in raw]
    for key, _ in pairs:
        for raw in raws:
            if "$" + key in raw or "${" + key in raw:
                if re.search(r"\$\{?" + key + r"(?![A-Za-z0-9_])", raw):
                    return True
    return False


def _q(path: str) -> str:
    """A path as one shell word: shlex-quoted, or double-quoted around base-image variables."""
    if _REF not in path:
        return shlex.quote(path)
    parts = path.split(_REF)
    return '"' + "".join(p if k % 2 else dfmod._esc_dq(p) for k, p in enumerate(parts)) + '"'


def _basename(path: str) -> str:
    b = posixpath.basename(path.rstrip("/"))
    return b if b not in ("", ".", "..") else "_"


_SAFE_SRC = re.compile(r"[A-Za-z0-9_./@%+=:, \u0080-\U0010ffff-]+")
_GLOB_SRC = re.compile(r"[A-Za-z0-9_./@%+=:,*?\[\]\u0080-\U0010ffff-]+")
_PLAIN_FILES = re.compile(r"[A-Za-z0-9_./@%+=:,-]+")
_GLOB_FILES = re.compile(r"[A-Za-z0-9_./@%+=:,*?\[\]-]+")


def _files_src(label: str, path: str, glob: bool = False) -> str:
    """A %files source. Apptainer splits the line on spaces outside double quotes and then
    expands each source like a shell word (globs, variables, even `command` substitution,
    run on the host), so only names that need no escaping are written here; others are
    reached through their folder (see :meth:`_Converter.stage_context`)."""
    if not (_SAFE_SRC.fullmatch(path) or (glob and _GLOB_SRC.fullmatch(path))):
        raise ConvertError(f"{label}: the file name {path[:60]!r} has characters Apptainer's %files would "
                           "interpret as shell syntax", hint="rename it, or copy its folder instead")
    if path.startswith("-"):
        path = "./" + path
    return f'"{path}"' if " " in path else path


def _files_dest(path: str) -> str:
    """A %files destination: taken literally by Apptainer (only spaces need the quotes)."""
    if "\n" in path or '"' in path:
        raise ConvertError(f"internal: staging path {path!r} cannot be written in %files")
    return f'"{path}"' if " " in path else path


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------

def convert(dockerfile: Path, *, context: Path | None = None, arch: str = "amd64",
            build_args: Mapping[str, str] | None = None, resolve_base: BaseResolver | None = None,
            source_label: str | None = None) -> Conversion:
    """Convert ``dockerfile`` (build context ``context``, default its folder) into a recipe."""

    if not isinstance(dockerfile, Path):
        dockerfile = Path(dockerfile)
    label = source_label or str(dockerfile)
    if "\n" in label or "\r" in label or "\x00" in label:
        raise ConvertError(f"invalid Dockerfile name {label!r}")
    if arch not in ("amd64", "arm64"):
        raise ConvertError(f"unknown architecture {arch!r}: choose amd64 or arm64")
    df, data = dfmod.load(dockerfile, label)
    sha = hashlib.sha256(data).hexdigest()
    ctx = (context if isinstance(context, Path) else Path(context)) if context is not None else dockerfile.parent
    conv = _Converter(df, ctx if ctx.is_absolute() else ctx.absolute(), arch, build_args or {}, resolve_base, label)
    try:
        conv.run()
    except RecursionError:
        raise ConvertError(f"{label}: too deeply nested to convert") from None
    conv.finish_notes()
    conv.prune()
    recipe = conv.render(sha)
    last = conv.stages[-1]
    base = str(conv.ctx_root).rstrip("/") + "/"
    files = tuple((rel, Path(base + rel)) for rel in sorted(conv.context_files))
    notes = tuple(sorted(conv.notes, key=lambda n: n.line))
    return Conversion(recipe=recipe, notes=notes, dockerfile=dockerfile, dockerfile_sha256=sha, context=ctx,
                      arch=arch, context_files=files, base_refs=tuple(conv.base_refs),
                      workdir=last.workdir if last.workdir_set and _REF not in last.workdir else None,
                      build_args=dict(sorted(conv.used_args.items())), source_label=label,
                      cmd=tuple(last.cmd) if last.cmd else None,
                      entrypoint=tuple(last.entrypoint) if last.entrypoint else None,
                      environment=_known_environment(last), stopsignal=last.stopsignal)


def _known_environment(st: _Stage) -> dict[str, str]:
    """The final image's environment as far as it is known: the base's plus literal ENV values."""
    env = dict(st.base_env)
    for key, value in st.env.items():
        if has_refs(value):
            env.pop(key, None)
        else:
            env[key] = literal(value)
    return dict(sorted(env.items()))


def heredoc_marker(body: str, base: str = "HPCEXP_EOF") -> str:
    """A here-document end marker that no line of ``body`` can be mistaken for.

    The shell ends a here-document at the first line equal to its marker, so a body line
    reading ``HPCEXP_EOF`` would cut the file short and run the rest as commands."""
    marker = base
    while marker in body:
        marker += "_"
    return marker
