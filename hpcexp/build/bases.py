"""Base images without a registry: local SIFs, site mirrors, and Debian bases built here.

A Dockerfile's ``FROM`` reference can be mapped in hpcexp.yaml (``bases:``) to

* ``sif``: a local SIF (``Bootstrap: localimage``); its identity is its sha256;
* ``image``: a URI Apptainer can bootstrap from on a registry the site runs
  (``docker://`` or ``oras://``); its identity is the URI, by digest once hpcexp.lock
  pins the tag (:mod:`hpcexp.build.registry`);
* ``debootstrap``: a Debian/Ubuntu base hpcexp builds itself with ``Bootstrap:
  debootstrap`` from a package mirror. The mirror is the spec's own, else
  ``debian_mirror`` from hpcexp.yaml, else the machine's Debian mirror read from its apt
  configuration. No mirror host is written into hpcexp: clusters without internet nearly
  always have a package mirror, and apt already knows where it is.

Debootstrap bases live in the per-user cache (``project.cache_dir / "bases"``), named by
a hash of the spec, so every project of the user shares them, and are built atomically
under a lock like any image.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from hpcexp.core.config import COMPONENT_RE, BaseSpec, host_arch
from hpcexp.errors import ConfigError, EnvironmentProblem
from hpcexp.infra.digest import sha256_hex

if TYPE_CHECKING:  # pragma: no cover
    from hpcexp.convert.model import BaseResolution, BaseResolver
    from hpcexp.core.config import Experiment, Project

log = logging.getLogger(__name__)

BASE_FORMAT = 1
APT_ROOT = Path("/etc/apt")
URI_RE = re.compile(r"^(https?|file)://\S+$")


# --------------------------------------------------------------------------------------
# The machine's Debian mirror
# --------------------------------------------------------------------------------------

def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    key: str | None = None
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.lstrip().startswith("#"):
            continue
        if not line.strip():
            if cur:
                stanzas.append(cur)
            cur, key = {}, None
            continue
        if line[0] in " \t" and key is not None:
            cur[key] += " " + line.strip()
            continue
        if ":" in line:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            cur[key] = value.strip()
    if cur:
        stanzas.append(cur)
    return stanzas


def apt_sources(apt_root: Path = APT_ROOT) -> list[tuple[str, list[str]]]:
    """(URI, suites) of every enabled ``deb`` source in the apt configuration, in file order."""
    out: list[tuple[str, list[str]]] = []
    sources_d = apt_root / "sources.list.d"
    files = sorted(sources_d.glob("*.sources")) if sources_d.is_dir() else []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for st in _deb822_stanzas(text):
            if "deb" not in st.get("types", "").split():
                continue
            if st.get("enabled", "yes").lower() == "no":
                continue
            suites = st.get("suites", "").split()
            for uri in st.get("uris", "").split():
                out.append((uri, suites))
    lists = [apt_root / "sources.list"]
    if sources_d.is_dir():
        lists += sorted(sources_d.glob("*.list"))
    for f in lists:
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            words = line.split()
            if not words or words[0] != "deb":
                continue
            words = words[1:]
            if words and words[0].startswith("["):
                while words and not words[0].endswith("]"):
                    words = words[1:]
                words = words[1:]
            if len(words) >= 2:
                out.append((words[0], [words[1]]))
    return out


def machine_mirror(suite: str | None = None, apt_root: Path = APT_ROOT) -> str | None:
    """The package mirror apt uses on this machine, preferring one that carries ``suite``.

    Security and update archives are skipped (debootstrap needs the main archive).
    """
    candidates: list[tuple[int, str]] = []
    for i, (uri, suites) in enumerate(apt_sources(apt_root)):
        if not URI_RE.match(uri):
            continue  # cdrom:, mirror+file:, tor+... are not something debootstrap can use
        if uri.rstrip("/").endswith("-security"):
            continue
        plain = [s for s in suites if "-" not in s and "/" not in s]
        if not plain:
            continue
        score = 0 if suite is not None and suite in plain else 1
        candidates.append((score * 10000 + i, uri.rstrip("/")))
    if not candidates:
        return None
    return min(candidates)[1]


def mirror_for(project: "Project", spec: BaseSpec, apt_root: Path = APT_ROOT) -> str:
    """The mirror a debootstrap base is built from, or EnvironmentProblem saying how to set one."""
    mirror = spec.mirror or project.debian_mirror or machine_mirror(spec.suite, apt_root)
    if not mirror:
        raise EnvironmentProblem(
            f"no Debian/Ubuntu package mirror known for base {spec.ref!r} (none in "
            f"{apt_root}/sources.list.d/*.sources or {apt_root}/sources.list)",
            hint="set `debian_mirror: URL` in hpcexp.yaml, or `mirror:` on that base")
    return mirror


# --------------------------------------------------------------------------------------
# Identity and paths
# --------------------------------------------------------------------------------------

def spec_hash(spec: BaseSpec) -> str:
    """Identity of a debootstrap base: what determines its content, not how it is fetched.

    The FROM reference is left out (two references may map to the same base) and so is an
    auto-detected mirror (a transport detail); an explicit ``mirror:`` is kept because it
    may select another distribution. The architecture is not in it either: bases are built
    natively, so it is the folder the base lives in (see :func:`base_sif_path`), which keeps
    the name a recipe uses the same on every machine.
    """
    doc = {"format": BASE_FORMAT, "kind": spec.kind, "suite": spec.suite, "include": sorted(spec.include),
           "components": list(spec.components), "mirror": spec.mirror}
    if spec.contract is not None:  # only when set, so that existing bases keep their names
        doc["contract"] = f"{spec.contract}/{CONTRACT_REVISION}"
    return sha256_hex(json.dumps(doc, sort_keys=True).encode())


def base_sif_path(project: "Project", spec: BaseSpec) -> Path:
    """Where the SIF of a debootstrap base for this machine lives (deterministic; it may not exist yet)."""
    return project.cache_dir / "bases" / host_arch() / base_sif_name(spec)


def base_sif_name(spec: BaseSpec) -> str:
    """The base's file name, the same for every architecture and machine."""
    return f"{spec.contract or 'debootstrap'}-{spec.suite}-{spec_hash(spec)[:16]}.sif"


# Recipes name hpcexp-built bases relative to this token instead of the per-user cache path,
# so a generated recipe is byte-identical for every user and clone (it can be committed and
# checked with `hpcexp convert --check`); the build substitutes the real folder in the
# private copy of the recipe it hands to Apptainer (:func:`materialize`).
CACHE_TOKEN = "@hpcexp-cache"


def recipe_ref(spec: BaseSpec) -> str:
    """How a recipe's ``From:`` names a debootstrap base: ``@hpcexp-cache/bases/NAME.sif``."""
    return f"{CACHE_TOKEN}/bases/{base_sif_name(spec)}"


def materialize(recipe_text: str, project: "Project") -> str:
    """The recipe with every ``From: @hpcexp-cache/bases/NAME`` pointing at this machine's
    base in this user's cache (``<cache>/bases/<arch>/NAME``)."""
    prefix = f"{CACHE_TOKEN}/bases/"
    out = []
    for line in recipe_text.splitlines(keepends=True):
        stripped = line.strip()
        ref = stripped[5:].strip() if stripped.startswith("From:") else ""
        if ref.startswith(prefix) and "/" not in ref[len(prefix):]:
            real = project.cache_dir / "bases" / host_arch() / ref[len(prefix):]
            line = line.replace(ref, str(real), 1)
        out.append(line)
    return "".join(out)


# The python:* image's contract (docs/bases.md): python/python3/pip/pip3 (and pythonX.Y,
# pipX.Y) in /usr/local/bin as in the official image; no PEP 668 marker, so pip installs
# system-wide (Debian's pip then installs into /usr/local and leaves Debian's own packages
# alone, so `pip install --upgrade pip` works as in the official image); package lists
# removed like the official image's. Bump CONTRACT_REVISION when this text changes: it is
# part of the base's identity, so existing stand-ins are rebuilt.
CONTRACT_REVISION = 1
PYTHON_CONTRACT_POST = r"""    rm -f /usr/lib/python3*/EXTERNALLY-MANAGED
    v="$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    for n in python python3 "python$v"; do ln -sf /usr/bin/python3 "/usr/local/bin/$n"; done
    for n in pip pip3 "pip$v"; do ln -sf /usr/bin/pip3 "/usr/local/bin/$n"; done
    apt-get clean
    rm -rf /var/lib/apt/lists/*"""


def debootstrap_recipe(spec: BaseSpec, mirror: str) -> str:
    """The Apptainer recipe of a debootstrap base (pure)."""
    lines = ["Bootstrap: debootstrap", f"OSVersion: {spec.suite}", f"MirrorURL: {mirror}"]
    if spec.include:
        lines.append(f"Include: {' '.join(spec.include)}")
    lines.append("")
    post: list[str] = []
    extra = [c for c in spec.components if c != "main"]
    if extra:
        # debootstrap writes a sources.list with `main` only; add the other components. The
        # config validates each component; they are checked again here because this text
        # becomes a shell command, and the sed program is quoted as one word.
        bad = [c for c in spec.components if not COMPONENT_RE.fullmatch(c)]
        if bad:
            raise ConfigError(f"bases.{spec.ref}.components: invalid archive component {bad[0]!r}")
        import shlex

        program = f"s/ main$/ {' '.join(spec.components)}/"
        post.append(f"    sed -i {shlex.quote(program)} /etc/apt/sources.list")
    if spec.contract == "python":
        post.append(PYTHON_CONTRACT_POST)
    if post:
        lines += ["%post", *post, ""]
    if spec.contract == "python":
        lines += ["%environment", "    export LANG=\"${LANG:-C.UTF-8}\"", ""]
    return "\n".join(lines)


def spec_for(exp: "Experiment | None", project: "Project", ref: str) -> BaseSpec | None:
    """The mapping for FROM reference ``ref``: the experiment's own, then the project's, then
    (unless ``build: {stand_ins: false}``) hpcexp's stand-in for an official python/debian image."""
    spec = (exp.bases.get(ref) if exp is not None else None) or project.bases.get(ref)
    if spec is None and project.stand_ins:
        from hpcexp.build import standins  # only for an unmapped FROM (a mapped one is a cached run's usual case)

        found = standins.stand_in(ref)
        if found is not None:
            return found.spec
    return spec


def resolution(project: "Project", spec: BaseSpec, context: Path | None = None) -> BaseResolution:
    """What the recipe header becomes for a mapped base (the one FROM -> base mapping).

    A local SIF inside the project is named relative to ``context`` (the build context,
    where ``apptainer build`` runs), so the recipe is the same in every clone; a base hpcexp
    builds is named by :func:`recipe_ref`, the same for every user.
    """
    # In-function: a cached run checks bases (spec_for, identity) without the converter.
    from hpcexp.convert.model import BaseResolution

    if spec.kind == "sif":
        assert spec.sif is not None
        sif = Path(spec.sif)
        if context is not None:
            try:
                sif.resolve().relative_to(project.root.resolve())
            except ValueError:
                return BaseResolution("localimage", str(sif))
            return BaseResolution("localimage", os.path.relpath(sif.resolve(), Path(context).resolve()))
        return BaseResolution("localimage", str(sif))
    if spec.kind == "image":
        assert spec.image is not None
        scheme, _, rest = pinned_image(project, spec.image).partition("://")
        return BaseResolution(scheme, rest)
    from hpcexp.build import standins

    found = standins.stand_in(spec.ref)
    if found is not None and found.spec == spec:
        notes = ((("translated", f"no `bases:` entry: hpcexp builds a stand-in, {found.summary} "
                                 f"(see docs/bases.md)"),)
                 + tuple(("approximated", f"stand-in differs: {d}") for d in found.differences))
        return BaseResolution("localimage", recipe_ref(spec), notes=notes)
    return BaseResolution("localimage", recipe_ref(spec))


def pinned_image(project: "Project", uri: str) -> str:
    """A registry base by the digest hpcexp.lock pins for its tag (``...@sha256:``), else as given."""
    from hpcexp.build import registry

    digest = registry.base_pin(project, uri)
    return registry.pinned_base_uri(uri, digest) if digest else uri


def identity(project: "Project", spec: BaseSpec | None, ref: str, digest: Callable[[Path], str]) -> str:
    """What goes into an image's input hash for one base.

    sif: its content hash (through the stat cache, so cheap when unchanged); image URI:
    the URI; debootstrap: the spec hash; unmapped: the reference itself.
    """
    if spec is None:
        return f"ref:{ref}"
    if spec.kind == "sif":
        assert spec.sif is not None
        try:
            return f"sif:{digest(spec.sif)}"
        except FileNotFoundError:
            from hpcexp.errors import NotFound
            raise NotFound(f"base image {spec.sif} (mapped from FROM {ref!r} in hpcexp.yaml bases) does not exist",
                           hint="fix the path under `bases:` or build/copy that SIF there") from None
    if spec.kind == "image":
        assert spec.image is not None
        return f"image:{pinned_image(project, spec.image)}"
    return f"debootstrap:{spec_hash(spec)}"


def ensure_base(project: "Project", spec: BaseSpec, progress: Callable[[str, str], None] | None = None, *,
                wait: bool = True) -> Path:
    """The SIF of a debootstrap base, building it first if missing (atomic, under a lock)."""
    if spec.kind == "sif":
        assert spec.sif is not None
        return spec.sif
    if spec.kind != "debootstrap":
        raise ValueError(f"ensure_base: {spec.kind} bases are not built by hpcexp")
    # In-function for start-up time: `hpcexp convert` needs this module's resolver, not the
    # builder (subprocess, locks, the container runtime).
    from hpcexp.build import builder, store
    from hpcexp.infra import process

    final = base_sif_path(project, spec)
    if store.valid_sif(final):
        return final
    # Not only on PATH: Debian installs debootstrap in /usr/sbin, which an ordinary user's
    # PATH lacks; the build hands Apptainer a PATH with those folders (builder._run_build).
    if process.find_host_tool("debootstrap") is None:
        raise EnvironmentProblem(f"base {spec.ref!r} is built with debootstrap, which is not installed "
                                 f"(looked on PATH and in {', '.join(process.HOST_TOOL_DIRS)})",
                                 hint="install Debian's `debootstrap` package (or ask your admins), or map "
                                      "the base to a SIF under `bases:` in hpcexp.yaml")
    mirror = mirror_for(project, spec)
    text = materialize(debootstrap_recipe(spec, mirror), project)
    builder.build_sif(project, text, final, context=final.parent, label=f"base {spec.ref}",
                      labels={"org.hpcexp.base.ref": spec.ref, "org.hpcexp.base.spec-hash": spec_hash(spec),
                              "org.hpcexp.base.mirror": mirror},
                      sidecar_extra={"kind": "debootstrap-base", "ref": spec.ref, "suite": spec.suite,
                                     "include": list(spec.include), "mirror": mirror,
                                     "spec_hash": spec_hash(spec)},
                      progress=progress, wait=wait)
    return final


def base_resolver(project: "Project", exp: "Experiment | None" = None,
                  context: Path | None = None) -> "BaseResolver":
    """The FROM -> BaseResolution map of ``exp`` (or the project): sif, image and debootstrap
    bases from hpcexp.yaml, then stand-ins for official images (:func:`spec_for`)."""
    ctx = Path(context) if context is not None else (exp.path if exp is not None else project.root)

    def resolve(ref: str) -> BaseResolution | None:
        spec = spec_for(exp, project, ref)
        if spec is None:
            return None
        res = resolution(project, spec, ctx)
        if spec.kind == "sif" and spec.sif is not None and not res.environment:
            # What a Dockerfile FROM this image sees: its environment, when hpcexp can read it
            from hpcexp.convert.baseenv import sif_environment

            sif = Path(spec.sif) if Path(spec.sif).is_absolute() else project.root / spec.sif
            env = sif_environment(sif, project.cache_dir / "base-environments.json")
            if env:
                res = dataclasses.replace(res, environment=tuple(sorted(env.items())))
        return res

    return resolve
