"""Rootless, content-addressed, cached and atomic image builds.

An image's identity (its *input hash*) is a sha256 over what determines its content:

* the recipe text, without its leading header comment (which names the Dockerfile and
  its hash, so a comment edit in the Dockerfile does not rebuild), and with the paths of
  mapped local bases replaced by placeholders (their identity is counted below instead);
* every file the recipe copies in from the build context (as listed by the converter,
  which honours ``.dockerignore``): relative path, executable bit and content hash. File
  hashes come from a stat cache (:mod:`hpcexp.infra.hashing`), so unchanged large files are
  not read again;
* each base's identity (:func:`hpcexp.build.bases.identity`); the architecture; the build
  arguments; a format version.

The image lives at ``images/NAME-ARCH-HASH.sif``; same inputs, same name, and when it is
there and valid nothing runs at all (no apptainer call).

Building is atomic and safe under concurrency: a lock that records its owner
(:mod:`hpcexp.infra.lock`) makes two builders of the same image run Apptainer once; the image
is built to a temporary name in the images folder (named by :func:`atomic.tmp_name_for`
so ``hpcexp clean`` can tell whether its owner is gone), its sidecar is written, then it
is renamed into place. A failed, interrupted or killed build therefore never leaves an
image that looks built, and its full log stays at ``images/.logs/NAME-ARCH-HASH.log``.

Provenance: labels (``apptainer inspect --labels``) and a sidecar JSON. The SIF's own
sha256 is only in the sidecar: a label is inside the file it would describe, so it cannot
carry that file's hash.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from hpcexp import __version__
from hpcexp.build import bases, hostnet, standins
from hpcexp.core.config import BaseSpec, Experiment, Project
from hpcexp.core.layout import Layout
from hpcexp.errors import BuildError, EnvironmentProblem, HpcexpError, Interrupted, StorageError
from hpcexp.infra import atomic, hashing, process
from hpcexp.infra import host as hostinfo
from hpcexp.infra.lock import Lock, Owner
from hpcexp.runtime import apptainer

log = logging.getLogger(__name__)

INPUT_FORMAT = 1
SIDECAR_SCHEMA = 1
TAIL_LINES = 20

Progress = Callable[[str, str], None]
"""progress(kind, text): kind is one of start, step, wait, note, warn, done."""


class ImageBuildFailed(BuildError):
    """apptainer build exited non-zero (exit code 4). The message is one line naming the
    log; ``tail`` holds the log's last lines for the CLI to show above it."""

    def __init__(self, message: str, *, tail: list[str], log_path: Path, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.tail = tail
        self.log_path = log_path


@dataclass(frozen=True)
class ImageInfo:
    """A built (or cached) image and its provenance."""

    experiment: str
    arch: str
    path: Path
    input_hash: str
    sha256: str | None
    recipe_sha256: str
    dockerfile_sha256: str
    base_refs: tuple[str, ...]
    workdir: str | None
    built: bool
    sidecar: Path
    apptainer_version: str | None
    build_seconds: float | None = None
    cmd: tuple[str, ...] | None = None        # the Dockerfile's CMD / ENTRYPOINT (argv), for the run's
    entrypoint: tuple[str, ...] | None = None  # parameters (see hpcexp.runtime.launch.plan)
    stopsignal: str | None = None              # the Dockerfile's STOPSIGNAL: what `hpcexp stop` sends first
    source_ref: str | None = None             # oras://...@sha256: when pulled from a registry (hpcexp.lock)


@dataclass(frozen=True)
class Prepared:
    """Everything known about an image before building it: conversion and identity."""

    experiment: str
    arch: str
    conversion: Any                     # hpcexp.convert.recipe.Conversion
    recipe_path: Path
    recipe_sha256: str
    input_hash: str
    image: Path
    base_specs: tuple[tuple[str, BaseSpec | None], ...]
    base_identities: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class ImageEntry:
    """One image in the images folder, as ``hpcexp images`` shows it."""

    experiment: str
    arch: str
    path: Path
    size: int
    age_seconds: float | None
    state: str                          # current | stale | corrupt
    input_hash: str | None
    built_at: str | None
    used_by: tuple[str, ...] = ()       # run ids whose record points at this image


@dataclass
class CleanReport:
    removed: list[tuple[str, str]] = field(default_factory=list)   # (path, why)
    kept: list[tuple[str, str]] = field(default_factory=list)      # (path, why kept)
    freed_bytes: int = 0


# --------------------------------------------------------------------------------------
# Identity
# --------------------------------------------------------------------------------------

_caches: dict[Path, hashing.StatCache] = {}


def stat_cache(project: Project) -> hashing.StatCache:
    """The project's stat cache, loaded once per process."""
    path = Layout(project).stat_cache()
    cache = _caches.get(path)
    if cache is None:
        cache = _caches[path] = hashing.StatCache(path)
    return cache


def normalize_recipe(text: str, base_paths: Iterable[str] = ()) -> str:
    """The recipe text that counts for identity: no leading comment block, local base
    paths replaced by placeholders (their content identity is hashed separately)."""
    lines = text.splitlines()
    i = 0
    while i < len(lines) and (lines[i].lstrip().startswith("#") or not lines[i].strip()):
        i += 1
    index = {p: n for n, p in enumerate(base_paths)}
    out = []
    for line in lines[i:]:
        m = re.match(r"^(\s*From:\s*)(\S+)\s*$", line)
        if m and m.group(2) in index:
            line = f"{m.group(1)}<base:{index[m.group(2)]}>"
        out.append(line)
    return "\n".join(out) + "\n"


def _file_entries(cache: hashing.StatCache, files: Iterable[tuple[str, Path]]) -> list[list[str]]:
    """[rel, kind, hash] for each context file (directories expanded, symlinks by target)."""
    out: list[list[str]] = []
    for rel, absolute in files:
        p = Path(absolute)
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            out.append([rel, "missing", ""])
            continue
        import stat as _stat
        if _stat.S_ISLNK(st.st_mode):
            out.append([rel, "link", os.readlink(p)])
        elif _stat.S_ISDIR(st.st_mode):
            children = []
            for root, dirs, names in os.walk(p):
                dirs.sort()
                for n in sorted(names):
                    full = Path(root) / n
                    children.append((str(Path(rel) / full.relative_to(p)), full))
            out.extend(_file_entries(cache, children))
        else:
            kind = "x" if st.st_mode & 0o111 else "f"
            out.append([rel, kind, cache.digest(p, os.stat(p))])
    return out


def input_hash(recipe_text: str, file_entries: list[list[str]], base_identities: Iterable[tuple[str, str]],
               arch: str, build_args: Mapping[str, str], base_paths: Iterable[str] = ()) -> str:
    """The image identity (pure): see the module docstring for what goes in and why."""
    doc = {
        "format": INPUT_FORMAT,
        "arch": arch,
        "recipe": hashing.sha256_text(normalize_recipe(recipe_text, base_paths)),
        "files": sorted(file_entries),
        "bases": [list(b) for b in base_identities],
        "build_args": sorted([k, v] for k, v in build_args.items()),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _resolver(project: Project, exp: Experiment) -> Callable[[str], Any]:
    """The converter's FROM resolver, so ``hpcexp convert`` and ``hpcexp build`` write
    identical recipes."""

    return bases.base_resolver(project, exp, exp.path)


def _convert(project: Project, exp: Experiment, arch: str, resolve: Callable[[str], Any]) -> Any:
    from hpcexp.convert import recipe

    dockerfile = exp.dockerfile(arch)
    try:
        label = str(dockerfile.relative_to(project.root))
    except ValueError:
        label = str(dockerfile)
    return recipe.convert(dockerfile, context=exp.path, arch=arch, build_args=dict(exp.build_args),
                          resolve_base=resolve, source_label=label)


def _write_recipe(project: Project, exp: Experiment, arch: str, conv: Any) -> Path:
    """Write recipes/NAME.ARCH.def (and its report) when the text changed."""
    layout = Layout(project)
    path = layout.recipe(exp.name, arch)
    try:
        current = path.read_text(encoding="utf-8")
    except OSError:
        current = None
    if current != conv.recipe:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, conv.recipe)
        report = conv.report(path.name) if hasattr(conv, "report") else {
            "dockerfile": str(conv.dockerfile), "dockerfile_sha256": conv.dockerfile_sha256,
            "notes": [{"line": n.line, "construct": n.construct, "action": n.action, "reason": n.reason,
                       "code": n.code} for n in conv.notes]}
        atomic.write_json(layout.report(exp.name, arch), report)
    return path


def prepare(project: Project, exp: Experiment, arch: str, *, write: bool = True) -> Prepared:
    """Convert (writing the recipe when stale if ``write``) and compute the image identity."""
    resolve = _resolver(project, exp)
    conv = _convert(project, exp, arch, resolve)
    recipe_path = Layout(project).recipe(exp.name, arch)
    if write:
        _write_recipe(project, exp, arch, conv)
    cache = stat_cache(project)
    specs = tuple((ref, bases.spec_for(exp, project, ref)) for ref in conv.base_refs)
    idents = tuple((ref, bases.identity(project, spec, ref, cache.digest)) for ref, spec in specs)
    base_paths = []
    for ref, spec in specs:
        if spec is not None and spec.kind in ("sif", "debootstrap"):
            res = resolve(ref)
            if res is not None and res.source:
                base_paths.append(res.source)
    files = _file_entries(cache, conv.context_files)
    h = input_hash(conv.recipe, files, idents, arch, conv.build_args, base_paths)
    cache.save()
    return Prepared(experiment=exp.name, arch=arch, conversion=conv, recipe_path=recipe_path,
                    recipe_sha256=hashing.sha256_text(conv.recipe), input_hash=h,
                    image=Layout(project).image(exp.name, arch, h), base_specs=specs, base_identities=idents)


# --------------------------------------------------------------------------------------
# Validity and sidecars
# --------------------------------------------------------------------------------------

def read_sidecar(image: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(image.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def valid_sif(image: Path, sidecar: dict[str, Any] | None = None) -> bool:
    """The image is at its final name, its sidecar exists and its size/sha256 match.

    Cheap when untouched: the SIF's (size, mtime_ns, inode) recorded in the sidecar are
    compared first; the content is re-hashed only when they differ (a copied folder).
    """
    if sidecar is None:
        sidecar = read_sidecar(image)
    if sidecar is None:
        return False
    try:
        st = os.stat(image)
    except OSError:
        return False
    if st.st_size != sidecar.get("size"):
        return False
    if sidecar.get("sif_stat") == [st.st_size, st.st_mtime_ns, st.st_ino]:
        return True
    if hashing.sha256_file(image) != sidecar.get("sha256"):
        return False
    # Same content under a new inode/mtime (a copied folder): remember it, so the next
    # check is a stat again. Best effort: the folder may be read-only for us.
    updated = dict(sidecar, sif_stat=[st.st_size, st.st_mtime_ns, st.st_ino])
    with contextlib.suppress(HpcexpError, OSError):
        atomic.write_json(image.with_suffix(".json"), updated)
    return True


def _info(prep: Prepared, sidecar: dict[str, Any], built: bool) -> ImageInfo:
    return ImageInfo(
        experiment=prep.experiment, arch=prep.arch, path=prep.image, input_hash=prep.input_hash,
        sha256=sidecar.get("sha256"), recipe_sha256=prep.recipe_sha256,
        dockerfile_sha256=prep.conversion.dockerfile_sha256, base_refs=tuple(prep.conversion.base_refs),
        workdir=prep.conversion.workdir, built=built, sidecar=prep.image.with_suffix(".json"),
        apptainer_version=sidecar.get("apptainer_version"),
        build_seconds=sidecar.get("build_seconds") if built else None,
        cmd=prep.conversion.cmd, entrypoint=prep.conversion.entrypoint,
        stopsignal=getattr(prep.conversion, "stopsignal", None),
        source_ref=sidecar.get("pulled_from") or sidecar.get("pushed_as"))


def current_image(project: Project, exp: Experiment, arch: str) -> ImageInfo | None:
    """The image for the current inputs if it is built and valid; never builds, never runs apptainer."""
    prep = prepare(project, exp, arch, write=False)
    sidecar = read_sidecar(prep.image)
    if sidecar is None or sidecar.get("input_hash") != prep.input_hash or not valid_sif(prep.image, sidecar):
        return None
    return _info(prep, sidecar, built=False)


# --------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------

def ensure_image(project: Project, exp: Experiment, arch: str, *, force: bool = False, quiet: bool = False,
                 progress: Progress | None = None, wait: bool = True, pull: bool = False) -> ImageInfo:
    """The image of ``exp`` for ``arch``: cached when its inputs are unchanged, else built.

    ``wait=False`` raises LockBusy (exit 75) instead of waiting for another builder.
    ``pull`` (run, submit): an image not built here that hpcexp.lock pins for these inputs
    is pulled by digest instead of built, and a pulled image is checked against ``verify:``
    before it is used (:mod:`hpcexp.build.registry`).
    """
    if quiet:
        progress = _only_warnings(progress)
    prep = prepare(project, exp, arch)
    sidecar = read_sidecar(prep.image)
    if not force and sidecar is not None and sidecar.get("input_hash") == prep.input_hash \
            and valid_sif(prep.image, sidecar):
        if not (pull and sidecar.get("kind") == "pulled"):
            return _info(prep, sidecar, built=False)
        from hpcexp.build import registry  # only when needed: it loads the HTTP and TLS modules

        if registry.check_before_run(project, prep.image, sidecar, f"{exp.name} {arch}", progress):
            return _info(prep, sidecar, built=False)
    if pull and not force and Layout(project).lock_file().exists():
        from hpcexp.build import registry

        pulled = registry.pull_for_run(project, exp, arch, prep.input_hash, progress=progress, wait=wait)
        if pulled is not None:
            return _info(prep, pulled, built=False)
    if any(spec is not None and spec.kind == "image" for _, spec in prep.base_specs):
        from hpcexp.build import registry

        # Registry bases given by tag: pin their digests first (the recipe then names them).
        if registry.pin_bases(project, [spec for _, spec in prep.base_specs], progress):
            return ensure_image(project, exp, arch, force=force, progress=progress, wait=wait, pull=pull)
    if progress is not None:
        _announce_bases(project, exp, arch, prep, progress)
    # Debootstrap bases are built first (cached in the user's cache dir like any image).
    base_digests: list[tuple[str, str]] = []
    for ref, spec in prep.base_specs:
        if spec is not None and spec.kind == "debootstrap":
            base = bases.ensure_base(project, spec, progress, wait=wait)
            side = read_sidecar(base) or {}
            base_digests.append((ref, f"sha256:{side.get('sha256', '?')}"))
        elif spec is not None and spec.kind == "sif":
            base_digests.append((ref, dict(prep.base_identities)[ref].replace("sif:", "sha256:")))
        elif spec is not None and spec.kind == "image":
            base_digests.append((ref, bases.pinned_image(project, str(spec.image))))  # by digest once pinned
        else:
            base_digests.append((ref, "unmapped"))
    conv = prep.conversion
    labels = {
        "org.hpcexp.experiment": exp.name,
        "org.hpcexp.arch": arch,
        "org.hpcexp.input-hash": prep.input_hash,
        "org.hpcexp.dockerfile-sha256": conv.dockerfile_sha256,
        "org.hpcexp.recipe-sha256": prep.recipe_sha256,
    }
    for i, (ref, digest) in enumerate(base_digests):
        labels[f"org.hpcexp.base.{i}.ref"] = ref
        labels[f"org.hpcexp.base.{i}.digest"] = digest
    extra = {
        "kind": "image", "experiment": exp.name, "arch": arch, "input_hash": prep.input_hash,
        "recipe": str(prep.recipe_path), "recipe_sha256": prep.recipe_sha256,
        "dockerfile": str(conv.dockerfile), "dockerfile_sha256": conv.dockerfile_sha256,
        "base_refs": list(conv.base_refs),
        "bases": [{"ref": r, "digest": d} for r, d in base_digests],
        "workdir": conv.workdir, "build_args": dict(conv.build_args),
        # what a Dockerfile FROM this image would see (hpcexp.convert.baseenv), and what `hpcexp stop` sends
        "environment": dict(conv.environment), "stopsignal": conv.stopsignal,
    }
    size_hint = 0
    for _, absolute in conv.context_files:
        with contextlib.suppress(OSError):
            size_hint += os.stat(absolute).st_size
    for _ref, spec in prep.base_specs:
        if spec is not None and spec.kind in ("sif", "debootstrap"):
            with contextlib.suppress(OSError):
                size_hint += os.stat(spec.sif if spec.kind == "sif" and spec.sif else
                                     bases.base_sif_path(project, spec)).st_size
    sidecar = build_sif(project, conv.recipe, prep.image, context=Path(conv.context), size_hint=size_hint,
                        label=f"{exp.name} {arch}", labels=labels, sidecar_extra=extra, progress=progress,
                        wait=wait, force=force, arch=arch, reuse_if=lambda s: s.get("input_hash") == prep.input_hash)
    return _info(prep, sidecar, built=bool(sidecar.pop("_built", True)))


def _announce_bases(project: Project, exp: Experiment, arch: str, prep: Prepared, progress: Progress) -> None:
    """One note per base hpcexp chose itself (a stand-in), one line per unmapped registry image."""
    report = Layout(project).report(exp.name, arch)
    for ref, spec in prep.base_specs:
        if spec is None:
            progress("note", standins.mapping_hint(ref))
            continue
        found = standins.stand_in(ref) if spec.kind == "debootstrap" else None
        if found is not None and found.spec == spec:
            more = f"; {len(found.differences)} difference(s) from the official image in {report}" \
                if found.differences else ""
            progress("note", f"FROM {ref}: no `bases:` entry, so hpcexp builds a stand-in: {found.summary}{more} "
                             "(docs/bases.md; map it under `bases:` to choose another)")


def _only_warnings(progress: Progress | None) -> Progress | None:
    if progress is None:
        return None
    inner = progress

    def filtered(kind: str, text: str) -> None:
        if kind == "warn":
            inner(kind, text)
    return filtered


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _label_value(value: str) -> str:
    return re.sub(r"\s+", " ", str(value)).strip() or "-"


def labelled_recipe(text: str, labels: Mapping[str, str]) -> str:
    """The recipe with a trailing %labels section (Apptainer merges several %labels sections)."""
    body = text if text.endswith("\n") else text + "\n"
    lines = ["", "%labels"] + [f"    {k} {_label_value(v)}" for k, v in labels.items()]
    return body + "\n".join(lines) + "\n"


_warned_fakeroot = False


def _fakeroot_check(progress: Progress | None) -> str:
    """How --fakeroot will map ids here; warn once when there is no subuid range.

    Without a range Apptainer (>= 1.1) falls back to a root-mapped user namespace, running
    %post under the ``fakeroot`` command when the host has one and bare otherwise; both
    build most recipes, but package managers that chown to other ids may fail, so the
    user is told once per process.
    """
    global _warned_fakeroot
    mode = apptainer.fakeroot_mode()
    if mode != "subuid" and not _warned_fakeroot:
        _warned_fakeroot = True
        how = "the fakeroot command" if mode == "fakeroot-command" else "no fakeroot command (none installed)"
        msg = (f"no /etc/subuid range for user {hostinfo.user()}: --fakeroot cannot map ids, so Apptainer builds in a "
               f"root-mapped user namespace with {how}; some package installs may fail "
               "(ask your admins for a subuid range; `hpcexp doctor` shows details)")
        log.info(msg)
        if progress is not None:
            progress("warn", msg)
    return mode


FAKED_FAILURE = ("error while starting the `faked' daemon", "libs/faked: not found")


def _step_of(line: str) -> str | None:
    s = line.strip()
    if s.startswith("INFO:"):
        return s[5:].strip()
    if s.startswith("+ "):
        return s
    if s.startswith("I: "):  # debootstrap's own progress (Retrieving, Extracting, Installing...)
        return s[3:]
    return None


def _describe_net(net: hostnet.BuildNetwork) -> str:
    if not net.enabled:
        return "off (no host CA bundle, proxy variables removed)"
    ca = f"CA bundle {net.ca_bundle} ({net.ca_source})" if net.ca_bundle else "no CA bundle found"
    return f"{ca}; proxy variables: {', '.join(net.proxy_vars) or 'none'}"


def _log_end(log_path: Path, size: int = 1 << 18) -> str:
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


# What a build in the root-mapped fallback (no subuid range) says when it needs a file to
# be owned by another id: only one id exists there, so every such change fails.
OWNERSHIP_FAILURE = ("failed to change uid", "change uid and gid", "cannot change ownership", "chown",
                     "setgroups", "setgid", "setuid", "seteuid", "setegid", "invalid argument",
                     "operation not permitted")


def _no_subuid_failure(exc: ImageBuildFailed, label: str) -> ImageBuildFailed:
    """The build failure of the no-subuid fallback, with the cause and the fix in the one line."""
    user = hostinfo.user()
    fix = f"usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}"
    text = "\n".join(exc.tail).lower()
    if any(s in text for s in OWNERSHIP_FAILURE):
        why = (f"there is no /etc/subuid+/etc/subgid range for {user}, so Apptainer built in its fallback (a "
               "root-mapped namespace with a single id), which cannot give files other owners or switch users "
               "as this recipe needs")
    else:
        why = (f"there is no /etc/subuid+/etc/subgid range for {user}, so Apptainer built in its limited fallback "
               "(a root-mapped namespace with a single id); that may be the cause")
    own = exc.message.split(": ", 1)[-1].rsplit("; log: ", 1)[0]
    return ImageBuildFailed(f"build of {label} failed: {why}; ask an admin for a range (`{fix}`); "
                            f"log: {exc.log_path}", tail=exc.tail, log_path=exc.log_path,
                            hint=f"the build's own last line: {own}")


def _translate_failure(label: str, rc: int, tail: list[str], log_path: Path, tmpdir: str, out_dir: Path,
                       net: hostnet.BuildNetwork | None = None) -> HpcexpError:
    text = "\n".join(tail).lower()
    last = next((ln.strip() for ln in reversed(tail)
                 if ln.strip() and ("fatal" in ln.lower() or "error" in ln.lower())),
                next((ln.strip() for ln in reversed(tail) if ln.strip()), f"exit code {rc}"))
    if "failed to create container namespaces" in text or "create container process: no space left" in text \
            or "user namespace" in text and ("not allowed" in text or "permission denied" in text):
        return EnvironmentProblem(
            f"build of {label} failed: user namespaces are unavailable on this machine ({last}); log: {log_path}",
            hint="ask your admins to enable unprivileged user namespaces (sysctl user.max_user_namespaces > 0; "
                 "on Ubuntu 24.04 an AppArmor profile for apptainer); `hpcexp doctor` shows details")
    if "no space left on device" in text or "disk quota exceeded" in text:
        return StorageError(
            f"build of {label} failed: no space left on device (scratch {tmpdir}, output {out_dir}); log: {log_path}",
            hint="free space, or set APPTAINER_TMPDIR / `images:` in hpcexp.yaml to a larger file system")
    if hostnet.tls_failure(text) or hostnet.tls_failure(_log_end(log_path)):
        return ImageBuildFailed(f"build of {label} failed (exit {rc}): {last}; log: {log_path}",
                                tail=list(tail), log_path=log_path, hint=hostnet.failure_hint(net))
    return ImageBuildFailed(f"build of {label} failed (exit {rc}): {last}; log: {log_path}",
                            tail=list(tail), log_path=log_path,
                            hint=f"the last lines are above; the full log is {log_path}")


def build_sif(project: Project, recipe_text: str, final: Path, *, context: Path, label: str,
              labels: Mapping[str, str], sidecar_extra: Mapping[str, Any], progress: Progress | None = None,
              wait: bool = True, force: bool = False, arch: str | None = None,
              reuse_if: Callable[[dict[str, Any]], bool] | None = None, size_hint: int = 0) -> dict[str, Any]:
    """Build ``recipe_text`` into ``final`` atomically under the image's lock; return its sidecar.

    If another process built ``final`` while we waited for the lock (and ``reuse_if``
    accepts its sidecar), that image is reused and the returned dict has ``_built`` False.
    """
    layout = Layout(project)
    inst = apptainer.require()
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise atomic.storage_error(exc, final.parent) from exc
    lock = Lock(layout.build_lock(final), purpose=f"build {final.name}")

    def on_wait(owner: Owner) -> None:
        if progress is not None:
            where = (f"if {owner.host} is down for good, remove {lock.path}" if owner.host != hostinfo.hostname()
                     else f"lock {lock.path}")
            progress("wait", f"{label}: waiting for {owner.describe()} who is building it ({where})")

    started_at = time.time()
    with lock.hold(wait=wait, on_wait=on_wait, what=f"image {final.name}"):
        side = read_sidecar(final)
        # With --force, reuse only an image another builder finished while we waited.
        fresh = not force or (final.exists() and os.stat(final).st_mtime >= started_at)
        if side is not None and fresh and (reuse_if is None or reuse_if(side)) and valid_sif(final, side):
            side["_built"] = False
            return side
        mode = _fakeroot_check(progress)
        extra = ["--ignore-fakeroot-command"] if mode == "none" else []
        if mode != "subuid" and os.environ.get("HPCEXP_SUBUID_FILE"):
            # The override names the subuid database to trust (tests, odd sites): make
            # Apptainer take the same no-range path instead of reading /etc/subuid itself.
            extra.append("--ignore-subuid")
        try:
            try:
                return _run_build(project, inst, recipe_text, final, context=context, label=label,
                                  labels=labels, sidecar_extra=sidecar_extra, progress=progress, arch=arch,
                                  extra=extra, size_hint=size_hint)
            except BuildError as exc:
                tail = "\n".join(getattr(exc, "tail", []))
                if mode != "fakeroot-command" or not any(s in tail for s in FAKED_FAILURE):
                    raise
                # The fakeroot command is bound in from the host and cannot start in some bases
                # (a static busybox has no dynamic loader): the bare root-mapped namespace can.
                if progress is not None:
                    progress("warn", f"{label}: the fakeroot command cannot run inside this base; "
                                     "retrying in the root-mapped namespace without it")
                return _run_build(project, inst, recipe_text, final, context=context, label=label,
                                  labels=labels, sidecar_extra=sidecar_extra, progress=progress, arch=arch,
                                  extra=[*(e for e in extra if e != "--ignore-fakeroot-command"),
                                         "--ignore-fakeroot-command"])
        except ImageBuildFailed as exc:
            if mode == "subuid":
                raise
            raise _no_subuid_failure(exc, label) from exc


def _run_build(project: Project, inst: apptainer.Installation, recipe_text: str, final: Path, *,
               context: Path, label: str, labels: Mapping[str, str], sidecar_extra: Mapping[str, Any],
               progress: Progress | None, arch: str | None, extra: list[str] | None = None,
               size_hint: int = 0) -> dict[str, Any]:
    layout = Layout(project)
    log_path = layout.build_log(final)
    tmp = atomic.tmp_name_for(final)
    env = apptainer.clean_env()
    # Apptainer runs host tools for a build (debootstrap, and debootstrap runs chroot and the
    # base's dpkg): give it the folders distributions keep them in, after the user's own PATH.
    env["PATH"] = process.host_tool_path(env.get("PATH"))
    # A private folder for the build's recipe copy and the host's CA bundle (and Apptainer's
    # scratch space unless APPTAINER_TMPDIR is set); `hpcexp clean` knows its name.
    base_tmp = env.get("TMPDIR") or tempfile.gettempdir()
    try:
        own_tmpdir = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{hostinfo.short_hostname()}-{os.getpid()}-",
                                      dir=base_tmp)
    except OSError as exc:
        raise atomic.storage_error(exc, Path(base_tmp)) from exc
    if not env.get("APPTAINER_TMPDIR"):
        env["APPTAINER_TMPDIR"] = own_tmpdir
    scratch = env["APPTAINER_TMPDIR"]
    prefix = "SINGULARITYENV_" if inst.program == "singularity" else "APPTAINERENV_"
    try:
        net = hostnet.prepare(Path(own_tmpdir) / "host", project.host_network, env, prefix=prefix)
    except OSError as exc:
        shutil.rmtree(own_tmpdir, ignore_errors=True)
        raise atomic.storage_error(exc, Path(own_tmpdir)) from exc
    env = net.apply(env)
    extra = list(extra or ()) + net.bind_argv()
    all_labels = dict(labels)
    all_labels.update({"org.hpcexp.apptainer-version": f"{inst.program} {inst.version}",
                       "org.hpcexp.host": hostinfo.hostname(), "org.hpcexp.user": hostinfo.user(),
                       "org.hpcexp.built-at": _now(), "org.hpcexp.hpcexp-version": __version__})
    build_recipe = Path(own_tmpdir) / f"{final.stem}.{os.getpid()}.def"
    # --force: the temp output never exists, but without it Apptainer keeps a base image's
    # label over ours when both set the same key (org.hpcexp.built-at of a debootstrap base).
    argv = apptainer.build_argv(inst.path, build_recipe, tmp, fakeroot=True, force=True,
                                arch=arch if arch and arch != _host_arch() else None, extra=extra or ())
    if progress is not None:
        for where in dict.fromkeys((final.parent, Path(scratch))):
            low = _low_space(where, size_hint)
            if low:
                progress("warn", f"{label}: {low}")
        progress("start", f"{label}: building")
    t0 = time.monotonic()
    tail: list[str] = []
    try:
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            text = labelled_recipe(bases.materialize(recipe_text, project), all_labels)
            if net.folder is not None:
                text = hostnet.inject_mount_point(text)
            build_recipe.write_text(text, encoding="utf-8")
            logf = open(log_path, "w", encoding="utf-8", errors="replace")  # noqa: SIM115
        except OSError as exc:
            raise atomic.storage_error(exc, log_path) from exc
        with logf:
            logf.write(f"# hpcexp {__version__} build of {label} at {_now()} on {hostinfo.hostname()}\n"
                       f"# cwd: {context}\n# argv: {hostnet.redact(' '.join(argv), net.secrets)}\n"
                       f"# APPTAINER_TMPDIR={scratch}\n# PATH={hostnet.redact(env['PATH'], net.secrets)}\n"
                       f"# host network: {_describe_net(net)}\n")
            logf.flush()
            rc = _stream(argv, env, context, logf, tail, progress, label, net.secrets)
        if rc != 0:
            raise _translate_failure(label, rc, tail, log_path, scratch, final.parent, net)
        if not tmp.exists():
            raise BuildError(f"build of {label} reported success but wrote no image; log: {log_path}")
        try:
            sha = hashing.sha256_file(tmp)
            st = os.stat(tmp)
            sidecar = dict(sidecar_extra)
            sidecar["host_network"] = net.describe()
            sidecar.update({
                "schema": SIDECAR_SCHEMA, "path": str(final), "sha256": sha, "size": st.st_size,
                "sif_stat": [st.st_size, st.st_mtime_ns, st.st_ino],
                "labels": all_labels, "apptainer_version": inst.version, "apptainer_program": inst.program,
                "host": hostinfo.hostname(), "user": hostinfo.user(), "built_at": all_labels["org.hpcexp.built-at"],
                "build_seconds": round(time.monotonic() - t0, 3), "hpcexp_version": __version__,
                "build_log": str(log_path),
                "note": "sha256 is the SIF's own hash; it cannot be a label inside the SIF it describes",
            })
            atomic.write_json(final.with_suffix(".json"), sidecar)
            os.replace(tmp, final)
            atomic.fsync_dir(final.parent)
        except OSError as exc:
            raise atomic.storage_error(exc, final) from exc
        sidecar["_built"] = True
        if progress is not None:
            progress("done", f"{label}: built in {time.monotonic() - t0:.1f} s")
        return sidecar
    except KeyboardInterrupt:
        raise Interrupted(f"build of {label} interrupted; no image was written; log: {log_path}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        with contextlib.suppress(OSError):
            build_recipe.unlink()
        shutil.rmtree(own_tmpdir, ignore_errors=True)


SCRATCH_PREFIX = "hpcexp-build-"


def scratch_dirs() -> list[tuple[Path, str, int]]:
    """Build scratch folders of this user in the temp dir: (path, host, pid of the owner)."""
    base = Path(os.environ.get("TMPDIR") or tempfile.gettempdir())
    out: list[tuple[Path, str, int]] = []
    try:
        children = list(base.iterdir())
    except OSError:
        return out
    for p in children:
        if not p.name.startswith(SCRATCH_PREFIX):
            continue
        m = re.match(r"^(?P<host>.+)-(?P<pid>\d+)-[^-]+$", p.name[len(SCRATCH_PREFIX):])
        try:
            mine = p.is_dir() and not p.is_symlink() and p.stat().st_uid == os.getuid()
        except OSError:
            mine = False
        if m and mine:
            out.append((p, m.group("host"), int(m.group("pid"))))
    return out


def _low_space(folder: Path, size_hint: int) -> str | None:
    """A warning when ``folder`` has less than twice the estimated image size free."""
    need = 2 * max(size_hint, 64 << 20)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if free >= need:
        return None
    return (f"only {free >> 20} MiB free in {folder}; this build may need about {need >> 20} MiB "
            "(set APPTAINER_TMPDIR or `images:` in hpcexp.yaml to a larger file system)")


def _host_arch() -> str:
    from hpcexp.core.config import host_arch
    return host_arch()


def _stream(argv: list[str], env: dict[str, str], cwd: Path, logf: Any, tail: list[str],
            progress: Progress | None, label: str, secrets: list[str] | None = None) -> int:
    """Run apptainer in its own process group, copying its output to the log and
    reporting build steps.

    Apptainer's build is a tree of processes (fakeroot re-exec, the build engine, the
    container's %post) that outlives a killed parent: PR_SET_PDEATHSIG reaches only the
    first one. So the tree gets its own process group, and a watchdog (infra.process) kills
    that group if hpcexp dies (kill -9, OOM) before saying the build is over. A
    half-built temp file left behind is then recognisably orphaned (``hpcexp clean``).
    """
    try:
        proc = process.spawn(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as exc:
        raise EnvironmentProblem(f"could not start {argv[0]}: {exc.strerror}") from exc
    watchdog = process.Watchdog.start(proc.pid)
    try:
        with proc:
            return _pump(proc, logf, tail, progress, label, secrets or [])
    finally:
        if watchdog is not None:
            watchdog.release()


def _signal_group(proc: "subprocess.Popen[bytes]", sig: int) -> None:
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, sig)


def _pump(proc: "subprocess.Popen[bytes]", logf: Any, tail: list[str], progress: Progress | None,
          label: str, secrets: list[str] | None = None) -> int:
    assert proc.stdout is not None
    try:
        for raw in proc.stdout:
            # A proxy URL's password never reaches the log, the tail or the terminal.
            line = hostnet.redact(raw.decode("utf-8", "replace").rstrip("\n"), secrets or [])
            try:
                logf.write(line + "\n")
                logf.flush()
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    tail.append("no space left on device (writing the build log)")
                    _signal_group(proc, signal.SIGKILL)
                    break
                raise
            tail.append(line)
            del tail[:-TAIL_LINES]
            step = _step_of(line)
            if step and progress is not None:
                progress("step", f"{label}: {step}")
        return proc.wait()
    except BaseException:
        # Ctrl-C (or SIGTERM turned into an exception): apptainer is in its own group and
        # did not see it. Ask the whole tree to stop, then insist; the output is discarded.
        for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, None)):
            _signal_group(proc, sig)
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        raise


# --------------------------------------------------------------------------------------
# Listing and cleaning
# --------------------------------------------------------------------------------------

_NAME_RE = re.compile(r"^(?P<name>.+)-(?P<arch>amd64|arm64)-(?P<hash>[0-9a-f]{16})\.sif$")


def _current_hashes(project: Project) -> dict[tuple[str, str], str | None]:
    out: dict[tuple[str, str], str | None] = {}
    for name, exp in project.experiments.items():
        for arch in exp.dockerfiles:
            try:
                out[(name, arch)] = prepare(project, exp, arch, write=False).input_hash
            except HpcexpError as exc:
                log.info("cannot compute the current identity of %s %s: %s", name, arch, exc)
                out[(name, arch)] = None
            except NotImplementedError:
                out[(name, arch)] = None
    return out


def _runs_by_image(project: Project) -> dict[str, list[str]]:
    from hpcexp.core.runs import iter_runs

    users: dict[str, list[str]] = {}
    try:
        for _, rec in iter_runs(Layout(project)):
            if rec.image:
                users.setdefault(os.path.realpath(rec.image), []).append(rec.run_id)
    except HpcexpError as exc:
        log.info("could not read run records: %s", exc)
    return users


def list_images(project: Project) -> list[ImageEntry]:
    """Every image in the images folder with its state (current for today's inputs, or stale)."""
    folder = project.images_dir
    if not folder.is_dir():
        return []
    current = _current_hashes(project)
    users = _runs_by_image(project)
    now = time.time()
    out = []
    for sif in sorted(folder.glob("*.sif")):
        m = _NAME_RE.match(sif.name)
        if not m:
            continue
        side = read_sidecar(sif)
        try:
            st = sif.stat()
        except OSError:
            continue
        name, arch = m.group("name"), m.group("arch")
        full = side.get("input_hash") if side else None
        if side is None or not valid_sif(sif, side):
            state = "corrupt"
        elif full is not None and current.get((name, arch)) == full:
            state = "current"
        else:
            state = "stale"
        from hpcexp.core.runs import parse_time
        built = parse_time(side.get("built_at")) if side else None
        out.append(ImageEntry(experiment=name, arch=arch, path=sif, size=st.st_size,
                              age_seconds=now - (built or st.st_mtime), state=state, input_hash=full,
                              built_at=side.get("built_at") if side else None,
                              used_by=tuple(users.get(os.path.realpath(sif), ()))))
    return out


def _tmp_owner_gone(name: str) -> tuple[bool, str]:
    owner = atomic.parse_tmp_owner(name)
    if owner is None:
        return False, "owner unknown"
    host, pid = owner
    me = hostinfo.short_hostname()
    if host != me:
        return False, f"owner on another host ({host} pid {pid})"
    if hostinfo.pid_alive(pid):
        return False, f"owner pid {pid} is running"
    return True, f"owner pid {pid} on {host} is gone"


def clean(project: Project, *, dry_run: bool = False, force: bool = False) -> CleanReport:
    """Remove stale or corrupt images (never one a run record points to, unless ``force``),
    orphaned temporary files whose owner is gone, and locks of dead owners."""
    report = CleanReport()
    folder = project.images_dir
    if not folder.is_dir():
        return report
    layout = Layout(project)

    def remove(path: Path, why: str) -> None:
        try:
            size = path.stat().st_size if path.is_file() else 0
        except OSError:
            size = 0
        if not dry_run:
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except FileNotFoundError:
                return
            except OSError as exc:
                report.kept.append((str(path), f"cannot remove: {exc.strerror}"))
                return
        report.removed.append((str(path), why))
        report.freed_bytes += size

    for entry in list_images(project):
        if entry.state == "current":
            continue
        if entry.used_by and not force:
            report.kept.append((str(entry.path), f"{entry.state}, but used by run {entry.used_by[-1]}"
                                + (f" and {len(entry.used_by) - 1} more" if len(entry.used_by) > 1 else "")
                                + " (use --force)"))
            continue
        lock = Lock(layout.build_lock(entry.path))
        if lock.path.exists():
            report.kept.append((str(entry.path), "being built (locked)"))
            continue
        remove(entry.path, entry.state)
        for extra in (entry.path.with_suffix(".json"), layout.build_log(entry.path)):
            if extra.exists():
                remove(extra, f"belongs to {entry.state} image")
    base_dir = project.cache_dir / "bases" / _host_arch()  # where bases.base_sif_path puts this machine's bases
    for d in (folder, folder / ".locks", folder / ".logs", base_dir, base_dir / ".locks", project.recipes_dir):
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if p.name.startswith(atomic.TMP_PREFIX):
                gone, why = _tmp_owner_gone(p.name)
                (remove(p, f"orphaned temporary file: {why}") if gone
                 else report.kept.append((str(p), f"temporary file in use: {why}")))
            elif d.name == ".locks" and p.suffix == ".lock":
                from hpcexp.infra.lock import read_owner
                owner = read_owner(p)
                if owner is not None and owner.is_dead():
                    remove(p, f"lock of {owner.describe()}, process gone")
    for p, host, pid in scratch_dirs():
        if host == hostinfo.short_hostname() and not hostinfo.pid_alive(pid):
            remove(p, f"build scratch of pid {pid}, process gone")
    return report
