"""What an image was built from, recorded beside it, so that a cached run checks its
identity without converting again.

The input hash (:mod:`hpcexp.build.identity`) counts the recipe, and the recipe comes
from a conversion: the Dockerfile parser, spython, the walk of the build context. A
cached ``hpcexp run`` or ``submit`` must not pay for that, so whenever the image pipeline
knows an image is current (it has just built it, or found it by converting), it records
what the conversion read in ``images/.inputs/NAME-ARCH-HASH.json``
(:meth:`hpcexp.core.layout.Layout.image_inputs`):

* the Dockerfile (path and sha256) and the build context folder;
* what the conversion read of the context (``Conversion.observed``): each ignore file
  tried (sha256, or absent), the listing of each folder it walked (sha256 of the names),
  the kind of each path it looked at; and the context files copied in, as the input hash
  counts them (path, kind, sha256);
* each base: its mapping (the ``bases:`` entry or the stand-in) and its identity;
* the options: the architecture, the build arguments given and those the Dockerfile used;
* hpcexp's version and a fingerprint of the converter's code and of spython's;
* the normalised recipe's sha256, and what a run needs of the image (CMD, ENTRYPOINT,
  WORKDIR, STOPSIGNAL).

:func:`find` replays those reads against the file system and hpcexp.yaml as they are now
(file hashes through the stat cache, so an unchanged file costs a ``stat``) and
recomputes the input hash from them. Any difference, or anything it cannot tell, sends
the caller to the full path (convert, hash, build if needed), which records again: a
record can only save work, never make a changed input not count. It imports nothing of
the converter or the builder.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hpcexp
from hpcexp.build import bases, identity
from hpcexp.build.store import read_sidecar, valid_sif
from hpcexp.core.layout import Layout
from hpcexp.errors import HpcexpError
from hpcexp.infra import atomic, hashing
from hpcexp.infra.jsonable import to_jsonable

if TYPE_CHECKING:  # pragma: no cover
    from hpcexp.core.config import Experiment, Project

log = logging.getLogger(__name__)

FORMAT = 1

# The code whose change may change a recipe or an identity: the converter, and the build
# modules that resolve bases and compute the hash. A change to any of them (a new hpcexp,
# an edited checkout, another spython) makes every record stale, so the next run converts.
_FINGERPRINTED = ("build/identity.py", "build/bases.py", "build/standins.py", "build/inputs.py")
_fingerprint: str | None = None


def converter_fingerprint() -> str:
    """hpcexp's version and the (size, mtime) of the converter's source files and of
    spython's version file: a few stats, no import."""
    global _fingerprint
    if _fingerprint is not None:
        return _fingerprint
    root = os.path.dirname(os.path.abspath(hpcexp.__file__))
    parts = [hpcexp.__version__]
    try:
        names = sorted("convert/" + n for n in os.listdir(os.path.join(root, "convert")) if n.endswith(".py"))
    except OSError:
        names = []
    for rel in (*names, *_FINGERPRINTED):
        try:
            st = os.stat(os.path.join(root, rel))
            parts.append(f"{rel}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            parts.append(f"{rel}:-")
    for entry in sys.path:  # where `import spython` would find it, without importing it
        candidate = os.path.join(entry or ".", "spython", "version.py")
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        parts.append(f"spython:{os.path.abspath(candidate)}:{st.st_size}:{st.st_mtime_ns}")
        break
    _fingerprint = hashing.sha256_text("\n".join(parts))
    return _fingerprint


def _spec(spec: Any) -> Any:
    return json.loads(json.dumps(to_jsonable(spec))) if spec is not None else None


def record(prep: Any, exp: "Experiment") -> dict[str, Any] | None:
    """The input record of a prepared image (``hpcexp.build.image.Prepared``, which imports
    this module); None when the conversion did not say what it read."""
    conv = prep.conversion
    observed = getattr(conv, "observed", None)
    if observed is None or not prep.recipe_digest:
        return None
    return {
        "format": FORMAT,
        "experiment": prep.experiment,
        "arch": prep.arch,
        "input_hash": prep.input_hash,
        "hpcexp_version": hpcexp.__version__,
        "converter": converter_fingerprint(),
        "dockerfile": str(exp.dockerfile(prep.arch)),
        "dockerfile_sha256": conv.dockerfile_sha256,
        "context": str(exp.path),
        "build_args_given": dict(exp.build_args),
        "build_args": dict(conv.build_args),
        "observed": json.loads(json.dumps(observed)),
        "sources": [[rel, str(path)] for rel, path in conv.context_files],
        "files": [list(e) for e in prep.files],
        "bases": [[ref, _spec(spec), ident] for (ref, spec), (_, ident) in zip(prep.base_specs, prep.base_identities)],
        "recipe_digest": prep.recipe_digest,
        "recipe_sha256": prep.recipe_sha256,
        "image": {"base_refs": list(conv.base_refs), "workdir": conv.workdir,
                  "cmd": list(conv.cmd) if conv.cmd is not None else None,
                  "entrypoint": list(conv.entrypoint) if conv.entrypoint is not None else None,
                  "stopsignal": getattr(conv, "stopsignal", None)},
    }


def save(project: "Project", prep: Any, exp: "Experiment") -> None:
    """Record what ``prep``'s image is built from (when it changed); best effort: without a
    record the next run only converts again."""
    doc = record(prep, exp)
    if doc is None:
        return
    path = Layout(project).image_inputs(prep.image)
    try:
        if json.loads(path.read_text(encoding="utf-8")) == doc:
            return
    except (OSError, ValueError):
        pass
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(path, doc)
    except (HpcexpError, OSError) as exc:
        log.info("could not record the inputs of %s: %s", prep.image, exc)


@dataclass(frozen=True)
class Found:
    """A current image found from its input record, without converting."""

    image: Path
    input_hash: str
    sidecar: dict[str, Any]
    record: dict[str, Any]


def _candidates(layout: Layout, name: str, arch: str) -> list[Path]:
    folder = layout.image_inputs_dir()
    prefix = f"{name}-{arch}-"
    try:
        with os.scandir(folder) as it:
            found = [(e.stat().st_mtime_ns, e.path) for e in it
                     if e.name.startswith(prefix) and e.name.endswith(".json") and len(e.name) == len(prefix) + 21]
    except OSError:
        return []
    return [Path(p) for _, p in sorted(found, reverse=True)]  # the newest record first


def _path_kind(path: str) -> str:
    import stat

    try:
        return "dir" if stat.S_ISDIR(os.lstat(path).st_mode) else "file"
    except OSError:
        return ""


def _ignore_file_unchanged(cache: hashing.StatCache, path: str, sha: str | None, link: str | None) -> bool:
    """One ignore file as the conversion tried it (see BuildContext): absent, or this content."""
    if sha is None:
        return not os.access(path, os.F_OK)
    try:
        now_link = os.path.realpath(path) if os.path.islink(path) else None
        return now_link == link and cache.digest(path) == sha
    except OSError:
        return False


def _check(project: "Project", exp: "Experiment", arch: str, doc: dict[str, Any],
           cache: hashing.StatCache) -> str | None:
    """The input hash of today's inputs if they are those ``doc`` recorded; None otherwise
    (or when the record is not one this version understands)."""
    if not (isinstance(doc, dict) and doc.get("format") == FORMAT and doc.get("experiment") == exp.name
            and doc.get("arch") == arch and doc.get("converter") == converter_fingerprint()):
        return None
    try:
        dockerfile = exp.dockerfile(arch)  # with its checks (inside the project); the full path says why not
    except HpcexpError:
        return None
    if doc.get("dockerfile") != str(dockerfile) or doc.get("context") != str(exp.path) \
            or doc.get("build_args_given") != dict(exp.build_args):
        return None
    try:
        if cache.digest(dockerfile) != doc.get("dockerfile_sha256"):
            return None
    except OSError:
        return None
    observed = doc.get("observed") or {}
    for path, sha, link in observed.get("ignore", ()):
        if not _ignore_file_unchanged(cache, path, sha, link):
            return None
    for path, kind in (observed.get("kinds") or {}).items():
        if _path_kind(path) != kind:
            return None
    for path, digest in (observed.get("dirs") or {}).items():
        names = hashing.folder_listing(path)
        if (None if names is None else hashing.listing_digest(names)) != digest:
            return None
    files = identity.file_entries(cache, [(rel, Path(p)) for rel, p in doc.get("sources", ())])
    if files != doc.get("files"):
        return None
    idents = []
    for ref, spec_doc, ident in doc.get("bases", ()):
        spec = bases.spec_for(exp, project, ref)
        if _spec(spec) != spec_doc:
            return None
        try:
            now = bases.identity(project, spec, ref, cache.digest)
        except (HpcexpError, OSError):
            return None  # the full path says what is wrong with the base
        if now != ident:
            return None
        idents.append((ref, now))
    h = identity.input_hash_of(str(doc.get("recipe_digest")), files, idents, arch, doc.get("build_args") or {})
    return h if h == doc.get("input_hash") else None


def find(project: "Project", exp: "Experiment", arch: str) -> Found | None:
    """The current image of ``exp`` for ``arch`` from the records of its last builds, when
    today's inputs are exactly those recorded and the image is valid; else None (the caller
    converts). Never converts, never builds, never runs apptainer."""
    layout = Layout(project)
    candidates = _candidates(layout, exp.name, arch)
    if not candidates:
        return None
    cache = identity.stat_cache(project)
    try:
        for path in candidates:
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            h = _check(project, exp, arch, doc, cache)
            if h is None:
                continue
            image = layout.image(exp.name, arch, h)
            if layout.image_inputs(image) != path:
                continue
            sidecar = read_sidecar(image)
            if sidecar is None or sidecar.get("input_hash") != h or not valid_sif(image, sidecar):
                continue
            # the generated recipe is an output the full path keeps up to date: if it was
            # edited or removed, take the full path, which writes it again
            try:
                recipe_text = layout.recipe(exp.name, arch).read_text(encoding="utf-8")
            except OSError:
                return None
            if hashing.sha256_text(recipe_text) != doc.get("recipe_sha256"):
                return None
            return Found(image=image, input_hash=h, sidecar=sidecar, record=doc)
        return None
    finally:
        cache.save()
