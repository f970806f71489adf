"""The recipe model: what a Dockerfile means for Apptainer, before any text is written.

The interpreter (:mod:`hpcexp.convert.interpret`) fills it from the Dockerfile's
instructions; the writer (:mod:`hpcexp.convert.writer`) renders it as recipe text. It is
split out so that the meaning of an instruction (which files are staged where, which
variables are exported, which steps run as whom) is decided in one place and the shell
quoting, here-document markers and section syntax in another.

A recipe is a list of :class:`Stage` objects (plus the external images a ``COPY --from``
names, also stages). A stage has its base (a :class:`BaseResolution`), the context and
stage files it stages through ``%files`` (:class:`StagedFile`), its ``%labels`` and
``%environment``, the ``%post`` steps in Dockerfile order and the image config that the
``%runscript`` and the fidelity report are made of (CMD, ENTRYPOINT, WORKDIR,
STOPSIGNAL). ``%post`` steps are the small typed records below; a Dockerfile instruction
that becomes several shell lines is one :class:`Block` of actions.

Paths may hold a reference to a variable only the base image defines (P33): it is kept
between two :data:`REF` characters and the writer leaves it to the shell.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Union

from hpcexp.convert.dockerfile import SLOTS

REF = "\x00"            # brackets a base-image variable inside a path (rendered by writer.q)
STAGING = "/.hpcexp"    # where %files puts what %post moves into place; removed at the end of %post
DEFAULT_SHELL = ("/bin/sh", "-c")


@dataclass(frozen=True)
class BaseResolution:
    """What a FROM reference became: the recipe header ``Bootstrap: X`` / ``From: Y``."""

    bootstrap: str       # "docker" | "localimage" | "oras" | "library" | ...
    source: str          # the From: value (a path for localimage, a reference otherwise)
    headers: tuple[tuple[str, str], ...] = ()  # extra header lines (debootstrap: OSVersion, MirrorURL, Include)
    environment: tuple[tuple[str, str], ...] = ()  # the base image's environment, when hpcexp can read it
    notes: tuple[tuple[str, str], ...] = ()    # (action, reason) for the report, e.g. a stand-in's differences


BaseResolver = Callable[[str], "BaseResolution | None"]

SCRATCH = BaseResolution("scratch", "")


class StagedFile(NamedTuple):
    """One ``%files`` line: ``src`` (relative to the context, or a path in stage ``stage``) to ``dest``."""

    stage: str | None
    src: str
    dest: str


# --------------------------------------------------------------------------------------
# %post steps
#
# Records, never changed once made (a stage FROM another stage shares its parent's). Not
# frozen only because a frozen dataclass is three times slower to create, and conversion
# speed is measured (bench/bench_convert.py).
# --------------------------------------------------------------------------------------

@dataclass(**SLOTS)
class Export:
    """``export K="v" ...``: one line; several pairs are assigned together (Docker's ENV rule)."""

    pairs: tuple[tuple[str, str], ...]   # (KEY, value as text inside double quotes)


@dataclass(**SLOTS)
class Unset:
    """``unset NAME``: a parent stage's ARG that a child stage does not inherit."""

    name: str


@dataclass(**SLOTS)
class Mkdir:
    """``mkdir -p PATH`` (WORKDIR, VOLUME, an empty staged folder)."""

    path: str


@dataclass(**SLOTS)
class Remove:
    """``rm -rf PATH``: a .dockerignore'd or excluded part of a staged folder."""

    path: str


# -- actions: the lines of one instruction's Block ---------------------------------------

@dataclass(**SLOTS)
class Shell:
    """Run ``text`` as Docker's ``SHELL + [text]`` would (default ``sh -c``, no ``-e``), as ``user``."""

    text: str
    shell: tuple[str, ...] = DEFAULT_SHELL
    user: str | None = None


@dataclass(**SLOTS)
class Exec:
    """Run an argument list without a shell (exec-form RUN), as ``user``."""

    argv: tuple[str, ...]
    user: str | None = None


@dataclass(**SLOTS)
class Script:
    """A ``#!`` here-document RUN: written to ``path``, made executable, run with its interpreter."""

    path: str
    body: str
    interpreter: str
    shell: tuple[str, ...] = DEFAULT_SHELL
    user: str | None = None


@dataclass(**SLOTS)
class Hide:
    """RUN --mount: TARGET is an empty folder for one step. ``mark`` None: an id from the step's position."""

    target: str
    mark: str | None = None


@dataclass(**SLOTS)
class Unhide:
    """After the step: TARGET is put back as it was (same ``mark`` as its :class:`Hide`)."""

    target: str
    mark: str | None = None


@dataclass(**SLOTS)
class BindCopy:
    """RUN --mount=type=bind: the staged source is copied onto the (hidden) target for the step."""

    staged: str
    target: str


@dataclass(**SLOTS)
class CopyIn:
    """COPY/ADD of one staged source into ``dest`` with Docker's rules (``into`` "dir" or "file")."""

    staged: str
    dest: str
    into: str


@dataclass(**SLOTS)
class CopyGlob:
    """COPY --from with a wildcard: everything staged in ``staged_dir`` goes into folder ``dest``."""

    staged_dir: str
    dest: str


@dataclass(**SLOTS)
class Unpack:
    """ADD of a local archive: extracted into ``dest`` (``kind``: tar, gz, bz2, xz, zst)."""

    staged: str
    dest: str
    kind: str


@dataclass(**SLOTS)
class Fetch:
    """ADD of a URL: downloaded to ``target`` during %post with curl or wget."""

    url: str
    target: str


@dataclass(**SLOTS)
class Clone:
    """ADD of a git repository: a shallow clone of ``ref`` (or the default branch) into ``dest``."""

    repo: str
    ref: str
    dest: str


@dataclass(**SLOTS)
class Prune:
    """COPY --from --exclude: what matches ``pattern`` is removed from the staged copy."""

    staged: str
    pattern: str


@dataclass(**SLOTS)
class Chmod:
    """COPY --chmod (recursive, on the staged copy) or a heredoc file's mode."""

    mode: str
    path: str
    recursive: bool = False


@dataclass(**SLOTS)
class Chown:
    """COPY --chown: owner set at build time; a build that cannot only warns."""

    owner: str
    path: str


@dataclass(**SLOTS)
class WriteFile:
    """COPY <<heredoc: ``body`` written to ``target``."""

    target: str
    body: str


Action = Union[Shell, Exec, Script, Hide, Unhide, BindCopy, CopyIn, CopyGlob, Unpack, Fetch, Clone, Prune, Chmod,
               Chown, WriteFile]


@dataclass(**SLOTS)
class Block:
    """One instruction's %post lines: ``# Dockerfile line N: WHAT``, then its actions (after a ``cd``)."""

    line: int
    what: str
    actions: tuple[Action, ...]
    chdir: str | None = None


Step = Union[Export, Unset, Mkdir, Remove, Block]


# --------------------------------------------------------------------------------------
# Stages and the recipe
# --------------------------------------------------------------------------------------

@dataclass(**SLOTS)
class Stage:
    """One Apptainer stage. The fields in the first group are what the writer renders; the
    second is the image config (what Docker records for the image); the last group is the
    interpreter's bookkeeping while it reads the stage (kept here because a stage built FROM
    another stage starts as a copy of it)."""

    index: int
    name: str                      # Apptainer stage name
    alias: str | None              # Docker AS name (lower-case)
    line: int
    # -- rendered ----------------------------------------------------------------------
    base: BaseResolution = SCRATCH
    files: list[StagedFile] = field(default_factory=list)
    post: list[Step] = field(default_factory=list)
    environment: list[tuple[str, str]] = field(default_factory=list)        # (KEY, rendered "value")
    labels: list[tuple[str, str]] = field(default_factory=list)
    uses_cp: bool = False          # %post needs the COPY helper function
    uses_mount: bool = False       # ... the RUN --mount helpers
    uses_as: bool = False          # ... the USER helper
    ext_before: list[str] = field(default_factory=list)   # external-image stages written before this one
    # -- image config ------------------------------------------------------------------
    env: dict[str, tuple] = field(default_factory=dict)   # ENV (and the base's) as word values
    workdir: str = "/"
    workdir_set: bool = False
    shell: tuple[str, ...] = DEFAULT_SHELL
    run_as: str | None = None      # USER (not root): later RUN steps run as this user
    cmd: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    entrypoint_shell: bool = False
    stopsignal: str | None = None
    base_ref: str | None = None
    base_env: dict[str, str] = field(default_factory=dict)   # the base image's own environment, when known
    ctx_files: set[str] = field(default_factory=set)       # context files this stage stages
    # -- interpreter bookkeeping ---------------------------------------------------------
    args: dict[str, tuple] = field(default_factory=dict)
    arg_unset: set[str] = field(default_factory=set)
    cwd_emitted: str | None = None
    cmd_set: bool = False
    runscript_line: int = 0
    stage_no: int = 0              # staging counter


@dataclass
class Recipe:
    """Everything the writer needs: stages in build order and the external images they copy from."""

    label: str                     # how the header names the Dockerfile
    sha256: str
    arch: str
    stages: list[Stage]
    external: list[Stage] = field(default_factory=list)
