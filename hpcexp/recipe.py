"""Dockerfile -> Apptainer recipe conversion, with a fidelity report.

The build, the CLI and the tests depend only on :class:`Conversion`, :class:`Note`,
:class:`BaseResolution` and :func:`convert` below.

Pipeline (why it looks like this: /work/shared/notes/spython-gaps.md, codes P01..P31):

1. :mod:`hpcexp.dockerfile` tokenizes the Dockerfile (directives, continuations, comments,
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
from hpcexp import dockerfile as dfmod
from hpcexp.dockerfile import (
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
    from hpcexp.config import Experiment, Project

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
_CHMOD = re.compile(r"[0-7]{3,4}|[ugoa]*[-+=][rwxXst]*(,[ugoa]*[-+=][rwxXst]*)*")
_URL = re.compile(r"^(https?|git)://|^git@")
_SIMPLE_PAIRS = re.compile(r"""\s*(?:[A-Za-z_][A-Za-z0-9_.-]*=(?:"[^"\\`]*"|'[^'\\`]*'|[^\s"'\\`]+)(?:\s+|$))+""")
_CP_FUNC = r'''_hpcexp_cp() {  # Docker COPY semantics: a folder's contents, or a file (into DEST if a folder)
    if [ -d "$1" ] && [ ! -L "$1" ]; then mkdir -p "$2" && cp -a "$1/." "$2/"
    elif [ "$3" = dir ] || [ -d "$2" ]; then mkdir -p "$2" && cp -a "$1" "$2/"
    else mkdir -p "$(dirname "$2")" && cp -a "$1" "$2"; fi
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
    ext_before: list[str] = field(default_factory=list)
    base_ref: str | None = None
    merged_from: str | None = None
    ctx_files: set[str] = field(default_factory=set)


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

    # -- helpers ----------------------------------------------------------------------
    def note(self, ins: "Instruction | None", construct: str, action: str, reason: str,
             code: str | None = None) -> None:
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

    def path_value(self, ins: "Instruction", value: "Value", what: str) -> str:
        if has_refs(value):
            names = sorted({s.name for s in value if not isinstance(s, str)})
            self.note(ins, f"{ins.keyword} {what}", "approximated",
                      f"${', $'.join(names)} comes from the base image, unknown at conversion time; "
                      "taken as unset", "P05")
        return literal(value)

    def abspath(self, path: str) -> str:
        assert self.cur is not None
        if not path.startswith("/"):
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
            self.emit(f"cd {shlex.quote(st.workdir)}")
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
            st.header = self.base_header(ins, ref)
            if ref != "scratch":
                st.base_ref = ref
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
            if keyword == "LABEL":
                raise self.fail(ins, "expects KEY=VALUE pairs")
            key, _, rest = text.strip().partition(" ")
            if not rest.strip():
                raise self.fail(ins, f"{key!r} needs a value")
            if len(rest.split()) > 1:
                self.note(ins, "ENV KEY value (legacy form)", "translated",
                          "the whole rest of the line is the value, as in Docker", "P10")
            return [(key, rest.strip())]
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
        for key, raw in self.env_pairs(ins, "ENV"):
            if not _VAR_NAME.match(key):
                raise self.fail(ins, f"invalid variable name {key[:40]!r}")
            wp = self.processor()
            try:
                value = wp.word(raw)
            except ValueError as exc:
                raise self.fail(ins, str(exc)) from None
            self.global_only_note(ins, wp)
            st.env[key] = value
            self._wp = None
            shown = render_shell(value)
            self.emit(f'export {key}="{shown}"')
            st.environment.append((key, shown))

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
                    body = [f"mkdir -p {STAGING}/run", f"cat > {path} <<'HPCEXP_EOF'",
                            script.rstrip("\n"), "HPCEXP_EOF", f"chmod +x {path}",
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
        if kind == "cache":
            self.note(ins, "RUN --mount=type=cache", "dropped",
                      "a build cache only speeds Docker up; the step runs without it", "P21")
            return [], []
        if kind == "tmpfs":
            self.note(ins, "RUN --mount=type=tmpfs", "dropped", f"{target} is an ordinary folder during the step",
                      "P21")
            return ([f"mkdir -p {shlex.quote(target)}"] if target else []), []
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
        lines.append(f"_hpcexp_cp {shlex.quote(staged)} {shlex.quote(tgt)} file")
        self.note(ins, "RUN --mount=type=bind", "translated",
                  f"{src} is copied to {tgt} for this step and removed after it", "P21")
        return lines, [f"rm -rf {shlex.quote(tgt)}"]

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

    def context_sources(self, ins: "Instruction", src: str) -> list[str]:
        norm = posixpath.normpath(src.replace("\\", "/") if self.df.escape == "`" else src).lstrip("/")
        if norm in (".", ""):
            norm = ""
        if norm == ".." or norm.startswith("../"):
            raise self.fail(ins, f"source {src!r} is outside the build context")
        ctx = self.context()
        found = ctx.match(norm)
        if not found:
            raise self.fail(ins, f"source {src!r} not found in the build context {self.ctx_root.name}/"
                            + (" (or excluded by .dockerignore)" if ctx.has_rules else ""))
        return found

    def stage_context(self, rel: str, n: int, k: int) -> str:
        """Add %files lines staging context path ``rel``; return the staged path."""
        st = self.cur
        assert st is not None
        ctx = self.context()
        base = _basename(rel) if rel else "_context"
        staged = f"{STAGING}/ctx/{n}/{k}/{base}"
        if ctx.is_dir(rel):
            members = ctx.under(rel)
            st.ctx_files.update(members)
            if ctx.filtered(rel) and all(_SAFE_SRC.fullmatch(f) for f in members):
                for f in members:
                    inner = f[len(rel) + 1:] if rel else f
                    st.files.append((None, f, f"{staged}/{inner}"))
            else:
                st.files.append((None, rel or ".", staged))
                # names %files cannot carry one by one: stage the folder, drop the ignored part in %post
                for path in ctx.ignored_paths(rel) if ctx.filtered(rel) else ():
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
        frm = None
        excludes: list[str] = []
        for fl, val in ins.flags:
            if fl == "chown":
                self.note(ins, f"{kw} --chown", "dropped", "the container runs as the invoking user, so file "
                          "owners from the Dockerfile do not apply; files belong to root in the image", "P04")
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
                self.note(ins, f"{kw} --parents", "approximated", "parent folders are not recreated", "P04")
            elif fl in ("checksum", "keep-git-dir"):
                self.note(ins, f"{kw} --{fl}", "dropped", "not checked by Apptainer", "P04")
            else:
                self.note(ins, f"{kw} --{fl}", "dropped", f"unknown {kw} option", "P04")
        if excludes:
            self.note(ins, f"{kw} --exclude", "approximated", "--exclude patterns are not applied", "P31")
        if ins.heredocs and ins.exec_form is None:
            self.copy_heredoc(ins, chmod)
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
        dest_raw = self.path_value(ins, words[-1], "destination")
        srcs = [self.path_value(ins, w, "source") for w in words[:-1]]
        dest_is_dir = dest_raw.endswith("/") or dest_raw in (".", "") or len(srcs) > 1
        dest = self.abspath(dest_raw or ".")
        if not dest_raw.startswith("/"):
            if st.workdir_set:
                self.note(ins, f"{kw} to {dest_raw}", "translated", f"relative destination resolved against "
                          f"WORKDIR to {dest}", "P05")
        st.stage_no += 1
        n = st.stage_no
        lines = [f"# Dockerfile line {ins.line}: {kw}"]
        targets: list[str] = []
        for k, src in enumerate(srcs):
            if add and _URL.match(src):
                lines += self.add_url(ins, src, dest, dest_is_dir)
                continue
            if frm is not None:
                path = posixpath.normpath("/" + src) if not src.startswith("/") else posixpath.normpath(src)
                if any(ch in path for ch in "*?["):
                    staged_dir = f"{STAGING}/from/{n}/{k}"
                    st.files.append((frm, path, staged_dir + "/"))
                    self.note(ins, f"{kw} --from with wildcard", "approximated",
                              "matches are copied into the destination folder", "P03")
                    lines.append(f"mkdir -p {shlex.quote(dest)} && cp -a {staged_dir}/. {shlex.quote(dest)}/")
                    continue
                staged = f"{STAGING}/from/{n}/{k}/{_basename(path)}"
                st.files.append((frm, path, staged))
                st.uses_cp = True
                lines.append(f"_hpcexp_cp {shlex.quote(staged)} {shlex.quote(dest)} "
                             f"{'dir' if dest_is_dir else 'file'}")
                targets.append(dest if dest_is_dir or path.endswith("/") else dest)
                continue
            rels = self.context_sources(ins, src)
            many = dest_is_dir or len(rels) > 1
            for j, rel in enumerate(rels):
                kk = f"{k}" if len(rels) == 1 else f"{k}.{j}"
                ctx = self.context()
                kind = _archive_kind(os.path.join(self.ctx_root, rel)) if add and not ctx.is_dir(rel) else ""
                if kind:
                    staged = self.stage_context(rel, n, kk)  # type: ignore[arg-type]
                    if kind == "tar":
                        unpack = f"tar -xf {shlex.quote(staged)} -C {shlex.quote(dest)}"
                    else:  # a pipe works with every tar, busybox's included (no -z/-j/-J needed)
                        unpack = f"{_DECOMPRESS[kind]} -dc {shlex.quote(staged)} | tar -xf - -C {shlex.quote(dest)}"
                    lines.append(f"mkdir -p {shlex.quote(dest)} && {unpack}")
                    self.note(ins, f"ADD {rel}", "translated", f"the archive is extracted into {dest}", "P08")
                    targets.append(dest)
                    continue
                staged = self.stage_context(rel, n, kk)  # type: ignore[arg-type]
                st.uses_cp = True
                lines.append(f"_hpcexp_cp {shlex.quote(staged)} {shlex.quote(dest)} {'dir' if many else 'file'}")
                if ctx.is_dir(rel) or not many:
                    targets.append(dest)
                else:
                    targets.append(posixpath.join(dest, _basename(rel)))
        if chmod:
            for t in dict.fromkeys(targets):
                lines.append(f"chmod -R {shlex.quote(chmod)} {shlex.quote(t)}")
            self.note(ins, f"{kw} --chmod", "translated", f"chmod {chmod} applied after the copy", "P04")
        self.emit(*lines)

    def copy_heredoc(self, ins: "Instruction", chmod: str | None) -> None:
        words = self.words(ins, ins.args)
        dest_raw = self.path_value(ins, words[-1], "destination")
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
            marker = "HPCEXP_EOF"
            while marker in body:
                marker += "_"
            lines += [f"mkdir -p {shlex.quote(posixpath.dirname(target) or '/')}",
                      f"cat > {shlex.quote(target)} <<'{marker}'", body.rstrip("\n"), marker]
            if chmod:
                lines.append(f"chmod {shlex.quote(chmod)} {shlex.quote(target)}")
        self.note(ins, f"{ins.keyword} <<heredoc", "translated", f"written to {dest} in %post", "P20")
        self.emit(*lines)

    def add_url(self, ins: "Instruction", url: str, dest: str, dest_is_dir: bool) -> list[str]:
        if url.startswith("git") or ".git" in url.split("#")[0][-5:] or url.startswith("git@"):
            repo, _, ref = url.partition("#")
            argv = ["git", "clone", "--depth", "1"] + (["--branch", ref] if ref else []) + [repo, dest]
            self.note(ins, f"ADD {url}", "approximated", "cloned with git during %post: the image needs git "
                      "and the build needs network access", "P08")
            return [f"mkdir -p {shlex.quote(posixpath.dirname(dest))}", shlex.join(argv)]
        name = _basename(url.split("?")[0].split("#")[0]) or "download"
        target = posixpath.join(dest, name) if dest_is_dir else dest
        q = shlex.quote(target)
        u = shlex.quote(url)
        self.note(ins, f"ADD {url}", "approximated", "downloaded during %post with curl or wget: the image needs "
                  "one of them and the build needs network access (or download it into the context and COPY it)",
                  "P08")
        return [f"mkdir -p {shlex.quote(posixpath.dirname(target))}",
                f"if command -v curl >/dev/null 2>&1; then curl -fsSL -o {q} {u}; "
                f"else wget -q -O {q} {u}; fi"]

    # -- WORKDIR / USER / SHELL / VOLUME ... ------------------------------------------
    def do_workdir(self, ins: "Instruction") -> None:
        st = self.cur
        assert st is not None
        words = self.words(ins, ins.args)
        if len(words) != 1:
            raise self.fail(ins, "expects one path")
        raw = self.path_value(ins, words[0], "path")
        if not raw:
            raise self.fail(ins, "expands to an empty path")
        st.workdir = self.abspath(raw)
        st.workdir_set = True
        if not raw.startswith("/") or raw != ins.args.strip():
            self.note(ins, "WORKDIR", "translated", f"resolved to the absolute path {st.workdir}", "P14")
        self.emit(f"mkdir -p {shlex.quote(st.workdir)}")

    def do_user(self, ins: "Instruction") -> None:
        user = literal(self.processor().word(ins.args.strip())) if ins.args.strip() else ""
        if user.split(":")[0] in ("root", "0"):
            self.note(ins, f"USER {user}", "translated", "the build runs as root anyway")
            return
        self.note(ins, f"USER {user}", "dropped",
                  f"Apptainer runs the container as whoever starts it, not as {user!r}; later RUN steps run as "
                  "root, so files they create belong to root and ~ means /root during the build", "P13")

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
            self.emit(f"mkdir -p {shlex.quote(ap)}")
            self.note(ins, f"VOLUME {ap}", "approximated", "the folder is created, but the image is read-only: "
                      "bind a host folder there (binds:) or run with --writable-tmpfs", "P27")

    def do_expose(self, ins: "Instruction") -> None:
        self.note(ins, f"EXPOSE {ins.args.strip()}", "dropped",
                  "Apptainer shares the host network; ports need no exposing", "P27")

    def do_stopsignal(self, ins: "Instruction") -> None:
        self.note(ins, f"STOPSIGNAL {ins.args.strip()}", "dropped", "Apptainer has no stop signal setting; "
                  "hpcexp stop sends SIGTERM", "P27")

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
            lines.append(f"cd {shlex.quote(st.workdir)}")
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
                      workdir=last.workdir if last.workdir_set else None,
                      build_args=dict(sorted(conv.used_args.items())), source_label=label,
                      cmd=tuple(last.cmd) if last.cmd else None,
                      entrypoint=tuple(last.entrypoint) if last.entrypoint else None)


def base_resolver(project: "Project", exp: "Experiment | None" = None,
                  context: Path | None = None) -> BaseResolver:
    """The FROM -> BaseResolution map of ``exp`` (or the project): sif, image and debootstrap bases."""
    from hpcexp import bases as bases_mod  # bases imports this module: load it only when needed

    ctx = Path(context) if context is not None else (exp.path if exp is not None else project.root)

    def resolve(ref: str) -> BaseResolution | None:
        spec = bases_mod.spec_for(exp, project, ref)  # hpcexp.yaml's bases, then a stand-in
        return None if spec is None else bases_mod.resolution(project, spec, ctx)

    return resolve
