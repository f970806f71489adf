"""Base images: the machine's mirror from apt configuration, debootstrap recipes, identity."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcexp.build import bases
from hpcexp.core.config import BaseSpec, load_project
from hpcexp.errors import EnvironmentProblem

MIRROR = "http://mirror.invalid/debian"


def apt(tmp_path: Path, sources: str | None = None, legacy: str | None = None) -> Path:
    root = tmp_path / "apt"
    (root / "sources.list.d").mkdir(parents=True)
    if sources is not None:
        (root / "sources.list.d" / "debian.sources").write_text(sources)
    if legacy is not None:
        (root / "sources.list").write_text(legacy)
    return root


def test_deb822_mirror_skips_security_and_prefers_suite(tmp_path: Path) -> None:
    root = apt(tmp_path, f"""Types: deb
URIs: {MIRROR}-security
Suites: bookworm-security
Components: main

# a comment
Types: deb-src
URIs: http://src.invalid/debian
Suites: bookworm

Types: deb
URIs: {MIRROR}/
Suites: bookworm bookworm-updates
Components: main
""")
    (root / "sources.list.d" / "z-sid.sources").write_text("Types: deb\nURIs: http://sid.invalid/debian\n"
                                                            "Suites: sid\nComponents: main\n")
    assert bases.machine_mirror("bookworm", root) == MIRROR
    assert bases.machine_mirror("sid", root) == "http://sid.invalid/debian"
    assert bases.machine_mirror(None, root) == MIRROR


def test_legacy_sources_list(tmp_path: Path) -> None:
    root = apt(tmp_path, legacy=f"# deb http://old.invalid/ x main\ndeb [arch=amd64 signed-by=/k.gpg] {MIRROR} "
                                f"bookworm main\ndeb cdrom:[Debian]/ bookworm main\n")
    assert bases.machine_mirror("bookworm", root) == MIRROR


def test_disabled_and_unusable_sources_are_ignored(tmp_path: Path) -> None:
    root = apt(tmp_path, "Types: deb\nURIs: http://off.invalid/debian\nSuites: bookworm\nEnabled: no\n\n"
                         "Types: deb\nURIs: mirror+file:///etc/apt/mirrors.txt\nSuites: bookworm\n")
    assert bases.machine_mirror("bookworm", root) is None


def test_mirror_precedence_and_missing_mirror(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "hpcexp.yaml").write_text("debian_mirror: http://conf.invalid/debian\n")
    project = load_project(tmp_path / "p")
    spec = BaseSpec(ref="python:3.11-slim", kind="debootstrap", suite="bookworm")
    root = apt(tmp_path, f"Types: deb\nURIs: {MIRROR}\nSuites: bookworm\n")
    assert bases.mirror_for(project, spec, root) == "http://conf.invalid/debian"
    own = BaseSpec(ref="x", kind="debootstrap", suite="bookworm", mirror="http://own.invalid/debian")
    assert bases.mirror_for(project, own, root) == "http://own.invalid/debian"
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "hpcexp.yaml").write_text("{}\n")
    plain = load_project(tmp_path / "q")
    assert bases.mirror_for(plain, spec, root) == MIRROR
    with pytest.raises(EnvironmentProblem) as ei:
        bases.mirror_for(plain, spec, apt(tmp_path / "empty"))
    assert "debian_mirror" in (ei.value.hint or "") and ei.value.exit_code == 3


def test_debootstrap_recipe_golden() -> None:
    spec = BaseSpec(ref="python:3.11-slim", kind="debootstrap", suite="bookworm",
                    include=("python3-minimal", "ca-certificates"))
    assert bases.debootstrap_recipe(spec, MIRROR) == (
        "Bootstrap: debootstrap\nOSVersion: bookworm\nMirrorURL: http://mirror.invalid/debian\n"
        "Include: python3-minimal ca-certificates\n")


def test_base_path_is_deterministic_and_ref_independent(tmp_path: Path) -> None:
    (tmp_path / "hpcexp.yaml").write_text("cache: .cache\n")
    project = load_project(tmp_path)
    a = BaseSpec(ref="python:3.11-slim", kind="debootstrap", suite="bookworm", include=("python3-minimal",))
    b = BaseSpec(ref="arm64v8/python:3.11-slim", kind="debootstrap", suite="bookworm", include=("python3-minimal",))
    c = BaseSpec(ref="python:3.11-slim", kind="debootstrap", suite="bookworm", include=("python3",))
    pa = bases.base_sif_path(project, a)
    assert pa == bases.base_sif_path(project, b)
    assert pa != bases.base_sif_path(project, c)
    assert pa.parent == project.cache_dir / "bases" / bases.host_arch() and pa.suffix == ".sif"
    assert bases.recipe_ref(a).endswith("/" + pa.name), "recipes name the base without the machine's arch"


def test_resolution_and_identity(tmp_path: Path) -> None:
    sif = tmp_path / "b.sif"
    sif.write_bytes(b"x")
    (tmp_path / "hpcexp.yaml").write_text(f"""bases:
  "busybox:latest": {{sif: {sif}}}
  "python:3.11": {{image: "docker://registry.invalid/library/python:3.11"}}
  "debian:12": {{debootstrap: bookworm}}
""")
    project = load_project(tmp_path)
    res = {ref: bases.resolution(project, spec) for ref, spec in project.bases.items()}
    assert (res["busybox:latest"].bootstrap, res["busybox:latest"].source) == ("localimage", str(sif))
    assert (res["python:3.11"].bootstrap, res["python:3.11"].source) == \
        ("docker", "registry.invalid/library/python:3.11")
    assert res["debian:12"].bootstrap == "localimage" and res["debian:12"].source.endswith(".sif")
    digest = lambda p: "d" * 64  # noqa: E731
    assert bases.identity(project, project.bases["busybox:latest"], "busybox:latest", digest) == "sif:" + "d" * 64
    assert bases.identity(project, None, "alpine", digest) == "ref:alpine"
    assert bases.identity(project, project.bases["debian:12"], "debian:12", digest).startswith("debootstrap:")


def test_recipe_names_debootstrap_base_portably_and_build_materializes_it(tmp_path: Path) -> None:
    """A recipe must not carry one user's cache path: it is committed and `convert --check`ed."""
    (tmp_path / "hpcexp.yaml").write_text("cache: .cache\nbases:\n  \"debian:12\": {debootstrap: bookworm}\n")
    project = load_project(tmp_path)
    spec = project.bases["debian:12"]
    res = bases.resolution(project, spec)
    assert res.source.startswith("@hpcexp-cache/bases/debootstrap-bookworm-") and res.source.endswith(".sif")
    assert "amd64" not in res.source and "arm64" not in res.source
    assert str(tmp_path) not in res.source
    recipe = f"# header From: {res.source}\nBootstrap: localimage\nFrom: {res.source}\n\n%post\n    echo From: x\n"
    built = bases.materialize(recipe, project)
    assert f"From: {bases.base_sif_path(project, spec)}\n" in built
    assert built.splitlines()[0] == recipe.splitlines()[0], "only From: header lines change"
    assert built.endswith("%post\n    echo From: x\n")
