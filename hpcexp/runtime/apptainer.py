"""The one place that knows Apptainer's command line.

Functions here return argument lists (never shell strings) for ``apptainer build``,
``run``/``exec`` and ``inspect``, and read facts about the installed Apptainer. They are
pure where they can be (argv builders, golden-tested), and the few that run something
go through :mod:`hpcexp.infra.process`.

SingularityCE >= 3.9 is accepted too: ``singularity`` is used when ``apptainer`` is not
on PATH.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from hpcexp.errors import EnvironmentProblem
from hpcexp.infra import host as hostinfo
from hpcexp.infra import process

MIN_APPTAINER = (1, 1, 0)
MIN_SINGULARITY = (3, 9, 0)
# Variables in the caller's shell that would silently add binds or change behaviour.
SCRUBBED_ENV_PREFIXES = ("APPTAINER_", "SINGULARITY_", "APPTAINERENV_", "SINGULARITYENV_")
SCRUBBED_ENV_KEEP = ("APPTAINER_TMPDIR", "APPTAINER_CACHEDIR", "SINGULARITY_TMPDIR", "SINGULARITY_CACHEDIR")


@dataclass(frozen=True)
class Installation:
    """Which container runtime is installed and its version."""

    program: str            # "apptainer" or "singularity": the name it was found under
    path: str
    version: str            # as printed, e.g. "1.4.5"
    version_tuple: tuple[int, int, int]
    product: str = ""       # what ``--version`` says it is ("apptainer", "singularity"); "" = as program

    @property
    def kind(self) -> str:
        """What the binary is, by its own word: a ``singularity`` link to Apptainer is Apptainer,
        and an ``apptainer`` that prints "singularity version 3.5" is an old Singularity."""
        return self.product or self.program

    @property
    def supports_unprivileged_build(self) -> bool:
        minimum = MIN_APPTAINER if self.kind == "apptainer" else MIN_SINGULARITY
        return self.version_tuple >= minimum

    @property
    def label(self) -> str:
        """``apptainer 1.4.5`` or, when the name and the product differ, ``apptainer (singularity 3.5.0)``."""
        if self.kind != self.program:
            return f"{self.program} ({self.kind} {self.version})"
        return f"{self.program} {self.version}"


def parse_version(text: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) from ``apptainer --version`` output such as 'apptainer version 1.4.5-1'."""
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def _product(text: str) -> str:
    low = text.lower()
    if "apptainer" in low:
        return "apptainer"
    if "singularity" in low:     # SingularityCE prints "singularity-ce version 3.11.4"
        return "singularity"
    return ""


def _probe(program: str) -> tuple[Installation | None, str | None]:
    """(installation, None), (None, why it does not work) or (None, None) when not on PATH."""
    path = process.which(program)
    if path is None:
        return None, None
    try:
        res = process.run([path, "--version"], timeout=30)
    except EnvironmentProblem as exc:
        return None, f"{path} could not be run: {exc}"
    if not res.ok:
        return None, f"`{path} --version` failed ({res.last_line()})"
    vt = parse_version(res.stdout)
    if vt is None:
        return None, f"`{path} --version` printed no version ({res.stdout.strip()[:80]!r})"
    m = re.search(r"\d+\.\d+(?:\.\d+)?\S*", res.stdout)
    return Installation(program, path, m.group(0) if m else res.stdout.strip(), vt, _product(res.stdout)), None


@functools.lru_cache(maxsize=None)
def _detect_cached(path_env: str) -> tuple[Installation | None, str | None]:
    inst, broken = _probe("apptainer")
    if inst is not None or broken is not None:
        # a broken apptainer is reported, never silently replaced by the singularity found
        # next (on Debian a link to the same Apptainer, whose version would then be judged
        # against SingularityCE's minimum)
        return inst, broken
    return _probe("singularity")


def detect() -> Installation | None:
    """The installed runtime (apptainer preferred), or None. Cached per PATH value."""
    return _detect_cached(os.environ.get("PATH", ""))[0]


def problem() -> str | None:
    """Why the runtime found on PATH does not work (its ``--version`` failed), or None."""
    return _detect_cached(os.environ.get("PATH", ""))[1]


def require() -> Installation:
    """The installed runtime, or EnvironmentProblem with the fix (exit code 3)."""
    inst = detect()
    if inst is None:
        broken = problem()
        if broken is not None:
            raise EnvironmentProblem(f"apptainer does not work: {broken}",
                                     hint="check the installation or `module load apptainer`; "
                                          "`hpcexp doctor` shows details")
        raise EnvironmentProblem("apptainer not found on PATH (nor singularity)",
                                 hint=process.INSTALL_HINTS["apptainer"])
    if not inst.supports_unprivileged_build:
        need = ".".join(map(str, MIN_APPTAINER if inst.kind == "apptainer" else MIN_SINGULARITY))
        raise EnvironmentProblem(f"{inst.kind} >= {need} required for rootless builds, found {inst.label} "
                                 f"at {inst.path}",
                                 hint="load a newer module or ask your admins; `hpcexp doctor` shows details")
    return inst


def clean_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment minus APPTAINER_*/SINGULARITY_* settings (binds, env injection).

    Tmp and cache dirs are kept: they only move scratch space.
    """
    env = dict(os.environ if base is None else base)
    for key in list(env):
        if key.startswith(SCRUBBED_ENV_PREFIXES) and key not in SCRUBBED_ENV_KEEP:
            del env[key]
    return env


def scrubbed_vars(base: Mapping[str, str] | None = None) -> list[str]:
    """Names :func:`clean_env` would drop (to warn the user once)."""
    env = os.environ if base is None else base
    return sorted(k for k in env if k.startswith(SCRUBBED_ENV_PREFIXES) and k not in SCRUBBED_ENV_KEEP)


def build_argv(program: str, recipe: Path, output: Path, *, fakeroot: bool = True,
               ignore_subuid: bool = False, force: bool = False, arch: str | None = None,
               build_args: Mapping[str, str] | None = None, extra: Sequence[str] = ()) -> list[str]:
    """``apptainer build`` argv for ``recipe`` into ``output``."""
    argv = [program, "build"]
    if fakeroot:
        argv.append("--fakeroot")
    if ignore_subuid:
        argv.append("--ignore-subuid")
    if force:
        argv.append("--force")
    if arch:
        argv += ["--arch", arch]
    for key in sorted(build_args or {}):
        argv += ["--build-arg", f"{key}={(build_args or {})[key]}"]
    argv += list(extra)
    argv += [str(output), str(recipe)]
    return argv


@dataclass(frozen=True)
class Mount:
    """A bind into the container. Paths holding ',' or ':' must use --mount (CSV-quoted)."""

    src: str
    dst: str
    readonly: bool = True

    def argv(self) -> list[str]:
        if any(c in self.src + self.dst for c in ",:") or any(c in self.src + self.dst for c in '"\n'):
            return ["--mount", "type=bind," + _csv_field("src=" + self.src) + "," + _csv_field("dst=" + self.dst)
                    + (",ro" if self.readonly else "")]
        return ["--bind", f"{self.src}:{self.dst}:{'ro' if self.readonly else 'rw'}"]


def _csv_field(text: str) -> str:
    """Quote one field of --mount's CSV syntax (double quotes, doubled inside)."""
    if any(c in text for c in ',"\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def action_argv(program: str, action: str, image: Path, *, args: Sequence[str] = (),
                mounts: Sequence[Mount] = (), containall: bool = True, cleanenv: bool = True,
                nv: bool = False, pwd: str | None = None,
                writable_tmpfs: bool = True, no_home: bool = False, extra: Sequence[str] = ()) -> list[str]:
    """``apptainer run|exec`` argv. The container's environment is not on the command line:
    pass :func:`payload_env` as the child's environment (``--env`` parses CSV and would
    split a value holding a comma)."""
    if action not in ("run", "exec"):
        raise ValueError(action)
    argv = [program, action]
    if containall:
        argv.append("--containall")
    if cleanenv and not containall:
        argv.append("--cleanenv")
    if no_home and not containall:
        argv.append("--no-home")
    if writable_tmpfs:
        argv.append("--writable-tmpfs")
    if nv:
        argv.append("--nv")
    if pwd:
        argv += ["--pwd", pwd]
    for m in mounts:
        argv += m.argv()
    argv += list(extra)
    argv.append(str(image))
    argv += list(args)
    return argv


def payload_env(program: str, env: Mapping[str, str], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for an ``apptainer run/exec`` process that injects ``env`` into the container.

    Each value travels as ``APPTAINERENV_KEY`` (``SINGULARITYENV_`` for singularity), which
    Apptainer passes through even with --cleanenv/--containall, byte for byte.
    """
    prefix = "SINGULARITYENV_" if os.path.basename(program) == "singularity" else "APPTAINERENV_"
    out = clean_env(base)
    for key, value in env.items():
        out[prefix + key] = value
    return out


def inspect_labels(image: Path) -> dict[str, str]:
    """Labels of a SIF (``apptainer inspect --json``); empty on failure."""
    import json

    inst = require()
    res = process.run([inst.path, "inspect", "--json", "--labels", str(image)], timeout=60)
    if not res.ok:
        return {}
    try:
        data = json.loads(res.stdout)
        labels = data.get("data", {}).get("attributes", {}).get("labels", {})
        return {str(k): str(v) for k, v in (labels or {}).items()}
    except (ValueError, AttributeError):
        return {}


def fakeroot_mode(path: Path | None = None) -> str:
    """How ``apptainer build --fakeroot`` will work for this user.

    ``subuid``: a full id mapping from /etc/subuid; ``fakeroot-command``: no range, so
    Apptainer uses a root-mapped namespace plus the ``fakeroot`` command; ``none``: no
    range and no ``fakeroot`` command, so the build cannot work.
    """
    if hostinfo.subid_ranges(subuid=path).full:
        return "subuid"
    return "fakeroot-command" if process.find_host_tool("fakeroot") else "none"
