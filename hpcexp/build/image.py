"""Images of experiments: rootless, content-addressed, cached and atomic (the build stage's face).

An experiment's image for one architecture is named by its *input hash*
(:mod:`hpcexp.build.identity`: the normalised recipe, the context files, the bases, the
architecture and the build arguments). It lives at ``images/NAME-ARCH-HASH.sif``; same
inputs, same name, and when it is there and valid nothing runs at all (no apptainer call).

This module is the pipeline: convert the Dockerfile (writing the recipe when stale),
compute the identity (:func:`prepare`), find the image in the store
(:mod:`hpcexp.build.store`, :func:`current_image`), and otherwise build its debootstrap
bases and then the image itself (:mod:`hpcexp.build.builder`, :func:`ensure_image`). The
result types callers use (``ImageInfo``, ``Prepared``, ``ImageEntry``, ``CleanReport``,
``ImageBuildFailed``) are importable from here, wherever they are defined.

A cache hit does not convert: :func:`ensure_image` and :func:`current_image` first check
the record of what the image was built from (:mod:`hpcexp.build.inputs`), and only when
that does not show the inputs unchanged do they convert, hash, and build if needed
(recording again). So importing this module loads neither the converter nor the builder;
they are imported where the full path needs them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from hpcexp.build import bases, inputs, store
from hpcexp.build.identity import file_entries, input_hash, input_hash_of, normalize_recipe, recipe_digest, stat_cache
from hpcexp.build.store import CleanReport, ImageEntry, read_sidecar, valid_sif
from hpcexp.core.config import BaseSpec, Experiment, Project
from hpcexp.core.layout import Layout
from hpcexp.errors import HpcexpError
from hpcexp.infra import atomic, hashing

if TYPE_CHECKING:  # pragma: no cover
    from hpcexp.build.builder import ImageBuildFailed, Progress

log = logging.getLogger(__name__)

__all__ = [
    "CleanReport", "ImageBuildFailed", "ImageEntry", "ImageInfo", "Prepared", "Progress",
    "clean", "current_image", "ensure_image", "input_hash", "list_images", "normalize_recipe",
    "prepare", "read_sidecar", "valid_sif",
]

_LAZY = {"ImageBuildFailed": "hpcexp.build.builder", "Progress": "hpcexp.build.builder"}


def __getattr__(name: str) -> Any:
    """The names re-exported from the builder, imported on first use (a cached run never does)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


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
    files: tuple[tuple[str, str, str], ...] = ()   # the context files as the input hash counts them
    recipe_digest: str = ""                        # sha256 of the normalised recipe (identity.recipe_digest)


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
    files = file_entries(cache, conv.context_files)
    digest = recipe_digest(conv.recipe, base_paths)
    h = input_hash_of(digest, files, idents, arch, conv.build_args)
    cache.save()
    return Prepared(experiment=exp.name, arch=arch, conversion=conv, recipe_path=recipe_path,
                    recipe_sha256=hashing.sha256_text(conv.recipe), input_hash=h,
                    image=Layout(project).image(exp.name, arch, h), base_specs=specs, base_identities=idents,
                    files=tuple(tuple(e) for e in files), recipe_digest=digest)


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


def _found_info(found: inputs.Found, built: bool = False) -> ImageInfo:
    """An ImageInfo from an input record (a cache hit that did not convert)."""
    rec, side = found.record, found.sidecar
    img = rec.get("image") or {}
    return ImageInfo(
        experiment=rec["experiment"], arch=rec["arch"], path=found.image, input_hash=found.input_hash,
        sha256=side.get("sha256"), recipe_sha256=rec["recipe_sha256"], dockerfile_sha256=rec["dockerfile_sha256"],
        base_refs=tuple(img.get("base_refs") or ()), workdir=img.get("workdir"), built=built,
        sidecar=found.image.with_suffix(".json"), apptainer_version=side.get("apptainer_version"),
        cmd=tuple(img["cmd"]) if img.get("cmd") is not None else None,
        entrypoint=tuple(img["entrypoint"]) if img.get("entrypoint") is not None else None,
        stopsignal=img.get("stopsignal"), source_ref=side.get("pulled_from") or side.get("pushed_as"))


def current_image(project: Project, exp: Experiment, arch: str) -> ImageInfo | None:
    """The image for the current inputs if it is built and valid; never builds, never runs apptainer."""
    found = inputs.find(project, exp, arch)
    if found is not None:
        return _found_info(found)
    prep = prepare(project, exp, arch, write=False)
    sidecar = read_sidecar(prep.image)
    if sidecar is None or sidecar.get("input_hash") != prep.input_hash or not valid_sif(prep.image, sidecar):
        return None
    return _info(prep, sidecar, built=False)


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
    refused: Path | None = None  # a pulled image whose verification failed just now
    if not force:
        # the cache hit of a run: what the last build recorded, checked without converting
        found = inputs.find(project, exp, arch)
        if found is not None:
            if not (pull and found.sidecar.get("kind") == "pulled"):
                return _found_info(found)
            from hpcexp.build import registry  # only when needed: it loads the HTTP and TLS modules

            if registry.check_before_run(project, found.image, found.sidecar, f"{exp.name} {arch}", progress):
                return _found_info(found)
            refused = found.image
    prep = prepare(project, exp, arch)
    sidecar = read_sidecar(prep.image)
    if not force and sidecar is not None and sidecar.get("input_hash") == prep.input_hash \
            and valid_sif(prep.image, sidecar):
        if not (pull and sidecar.get("kind") == "pulled"):
            inputs.save(project, prep, exp)
            return _info(prep, sidecar, built=False)
        from hpcexp.build import registry  # only when needed: it loads the HTTP and TLS modules

        if prep.image != refused and registry.check_before_run(project, prep.image, sidecar, f"{exp.name} {arch}",
                                                               progress):
            inputs.save(project, prep, exp)
            return _info(prep, sidecar, built=False)
    if pull and not force and Layout(project).lock_file().exists():
        from hpcexp.build import registry

        pulled = registry.pull_for_run(project, exp, arch, prep.input_hash, progress=progress, wait=wait)
        if pulled is not None:
            inputs.save(project, prep, exp)
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
    # The recipe names debootstrap bases portably (@hpcexp-cache); the build gets this machine's paths.
    from hpcexp.build.builder import build_sif

    sidecar = build_sif(project, bases.materialize(conv.recipe, project), prep.image, context=Path(conv.context),
                        size_hint=size_hint, label=f"{exp.name} {arch}", labels=labels, sidecar_extra=extra,
                        progress=progress, wait=wait, force=force, arch=arch,
                        reuse_if=lambda s: s.get("input_hash") == prep.input_hash)
    built = bool(sidecar.pop("_built", True))
    inputs.save(project, prep, exp)
    return _info(prep, sidecar, built=built)


def _announce_bases(project: Project, exp: Experiment, arch: str, prep: Prepared, progress: Progress) -> None:
    """One note per base hpcexp chose itself (a stand-in), one line per unmapped registry image."""
    from hpcexp.build import standins

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


def list_images(project: Project) -> list[ImageEntry]:
    """Every image in the images folder with its state (current for today's inputs, or stale)."""
    return store.list_images(project, _current_hashes(project))


def clean(project: Project, *, dry_run: bool = False, force: bool = False) -> CleanReport:
    """Remove stale or corrupt images (never one a run record points to, unless ``force``),
    orphaned temporary files whose owner is gone, and locks of dead owners."""
    return store.clean(project, _current_hashes(project), dry_run=dry_run, force=force)
