"""What ``hpcexp list`` knows about each experiment, cheaply.

Listing must start as fast as ``import click, yaml`` (it is benchmarked), so nothing
here imports spython, hashes build contexts or runs apptainer: recipe state comes from
the sha256 of the Dockerfile recorded in the recipe's header comment, image state from
the newest image sidecar's recorded recipe hash. That cannot see a changed file in the
build context, so an image whose recipe still matches is reported as ``built``, not
``current``; ``hpcexp images`` computes the full input hash and says ``current`` or
``stale`` exactly.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from hpcexp.core.config import ARCHES, Experiment, Project
from hpcexp.core.layout import Layout
from hpcexp.infra.digest import sha256 as _sha256  # small files: no OpenSSL start-up

HEX64 = re.compile(r"\b[0-9a-f]{64}\b")


@dataclass(frozen=True)
class ExperimentInfo:
    name: str
    path: str
    declared: bool
    ref: str | None
    code: str | None
    dockerfiles: dict[str, str]
    arches: list[str]
    recipe: dict[str, str] = field(default_factory=dict)   # arch -> missing | current | stale
    image: dict[str, str] = field(default_factory=dict)    # arch -> none | built | stale


def _open_regular(path: Path) -> int:
    """A descriptor of regular file ``path``; never blocks on a FIFO or device (OSError)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return fd


def file_sha256(path: Path) -> str | None:
    try:
        h = _sha256()
        with open(_open_regular(path), "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    except OSError:
        return None


def recipe_state(layout: Layout, exp: Experiment, arch: str) -> str:
    recipe = layout.recipe(exp.name, arch)
    try:
        with open(_open_regular(recipe), encoding="utf-8", errors="replace") as fh:
            head = [next(fh, "") for _ in range(8)]
    except OSError:
        return "missing"
    df = exp.dockerfiles.get(arch)
    want = file_sha256(df) if df else None
    recorded = {m for line in head if line.startswith("#") for m in HEX64.findall(line)}
    return "current" if want and want in recorded else "stale"


_SIDECAR_RE = re.compile(r"^(?P<key>.+-(?:amd64|arm64))-[0-9a-f]{16}\.json$")


def _sidecars(images: Path) -> dict[str, list[tuple[int, Path]]]:
    """The images folder read once: ``NAME-ARCH`` -> [(mtime_ns, sidecar)] of the sidecars
    whose SIF is there (a listing per experiment made `list` quadratic in experiments)."""
    try:
        with os.scandir(images) as it:
            entries = {e.name: e for e in it}
    except OSError:
        return {}
    out: dict[str, list[tuple[int, Path]]] = {}
    for name, entry in entries.items():
        m = _SIDECAR_RE.match(name)
        if m is None or name[:-5] + ".sif" not in entries:
            continue
        try:
            out.setdefault(m.group("key"), []).append((entry.stat().st_mtime_ns, Path(entry.path)))
        except OSError:
            continue
    return out


def image_state(layout: Layout, exp: Experiment, arch: str,
                sidecars_by_key: dict[str, list[tuple[int, Path]]] | None = None) -> str:
    if sidecars_by_key is None:
        sidecars_by_key = _sidecars(layout.project.images_dir)
    sidecars = [p for _, p in sorted(sidecars_by_key.get(f"{exp.name}-{arch}", ()))]
    if not sidecars:
        return "none"
    recipe_sha = file_sha256(layout.recipe(exp.name, arch))
    try:
        data = json.loads(sidecars[-1].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "stale"
    return "built" if recipe_sha and data.get("recipe_sha256") == recipe_sha else "stale"


def describe(project: Project) -> list[ExperimentInfo]:
    """One entry per experiment, sorted by name."""
    layout = Layout(project)
    sidecars = _sidecars(project.images_dir)
    out = []
    for name in sorted(project.experiments):
        exp = project.experiments[name]
        arches = [a for a in ARCHES if a in exp.dockerfiles]
        out.append(ExperimentInfo(
            name=name, path=_rel(exp.path, project.root), declared=exp.declared, ref=exp.ref, code=exp.code,
            dockerfiles={a: _rel(p, exp.path) for a, p in sorted(exp.dockerfiles.items())},
            arches=arches,
            recipe={a: recipe_state(layout, exp, a) for a in arches},
            image={a: image_state(layout, exp, a, sidecars) for a in arches},
        ))
    return out


def _rel(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)
