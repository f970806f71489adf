"""A cache hit checks the image's recorded inputs instead of converting (hpcexp.build.inputs):
the real converter, the fake apptainer. Every kind of change still rebuilds; a change that
does not count converts again (to be sure) and records again; nothing else converts."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from hpcexp.build import identity, image, inputs
from hpcexp.convert import recipe
from hpcexp.core.config import load_project
from hpcexp.core.layout import Layout
from tests.conftest import REPO

FAKES = Path(__file__).parent / "buildfakes"
FORBIDDEN = ("spython", "hpcexp.convert", "hpcexp.build.builder")


@pytest.fixture
def fake_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """PATH with the fake apptainer; returns the environment a child process needs."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "apptainer").symlink_to(FAKES / "fake_apptainer")
    subuid = tmp_path / "subuid"
    subuid.write_text(f"{getpass.getuser()}:100000:65536\n")
    env = {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "FAKE_APPTAINER_LOG": str(tmp_path / "calls.log"),
           "HPCEXP_SUBUID_FILE": str(subuid), "HPCEXP_SUBGID_FILE": str(subuid), "TMPDIR": str(tmp_path),
           "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(identity, "_caches", {})
    return env


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The Dockerfiles converted (the real converter, counted)."""
    seen: list[str] = []
    real = recipe.convert

    def counting(dockerfile, **kw):  # type: ignore[no-untyped-def]
        seen.append(str(dockerfile))
        return real(dockerfile, **kw)

    monkeypatch.setattr(recipe, "convert", counting)
    return seen


def make_project(root: Path, base: Path, *, yaml_extra: str = "") -> Path:
    exp = root / "experiments" / "hello"
    exp.mkdir(parents=True)
    (root / "hpcexp.yaml").write_text(f'bases:\n  "busybox:latest": {{sif: "{base}"}}\n{yaml_extra}')
    (exp / "Dockerfile").write_text('FROM busybox:latest\nARG GREETING=hi\nCOPY hello.sh data/ /app/\n'
                                    'RUN echo $GREETING\nWORKDIR /app\nSTOPSIGNAL SIGINT\n'
                                    'ENTRYPOINT ["sh"]\nCMD ["/app/hello.sh"]\n')
    (exp / "hello.sh").write_text("echo hello\n")
    (exp / "data").mkdir()
    (exp / "data" / "keep.txt").write_text("data\n")
    (exp / "data" / "skip.tmp").write_text("ignored\n")
    (exp / ".dockerignore").write_text("**/*.tmp\n")
    return root


@pytest.fixture
def proj(tmp_path: Path, fake_env: dict[str, str]) -> Path:
    base = tmp_path / "base.sif"
    base.write_bytes(b"base image bytes")
    return make_project(tmp_path / "proj", base)


def ensure(root: Path, **kw):  # type: ignore[no-untyped-def]
    project = load_project(root)
    return image.ensure_image(project, project.experiment("hello"), "amd64", **kw)


def record_of(info) -> dict:  # type: ignore[no-untyped-def]
    project = load_project(info.path.parents[1])
    return json.loads(Layout(project).image_inputs(info.path).read_text())


def test_a_cache_hit_reads_the_record_and_converts_nothing(proj: Path, conversions: list[str]) -> None:
    first = ensure(proj)
    assert first.built and len(conversions) == 1
    rec = record_of(first)
    assert rec["input_hash"] == first.input_hash and rec["dockerfile_sha256"] == first.dockerfile_sha256
    assert sorted(rel for rel, _ in rec["sources"]) == ["data/keep.txt", "hello.sh"]
    assert any(p.endswith("/.dockerignore") and sha for p, sha, _ in rec["observed"]["ignore"])
    assert any(p.endswith("/data") for p in rec["observed"]["dirs"])
    second = ensure(proj)
    assert len(conversions) == 1, "a cache hit must not convert"
    assert not second.built and second.path == first.path
    # the same facts as the full path: what a run needs of the image
    for field in ("input_hash", "sha256", "recipe_sha256", "dockerfile_sha256", "base_refs", "workdir", "cmd",
                  "entrypoint", "stopsignal", "sidecar", "apptainer_version"):
        assert getattr(second, field) == getattr(first, field), field
    assert second.cmd == ("/app/hello.sh",) and second.entrypoint == ("sh",) and second.stopsignal == "SIGINT"
    project = load_project(proj)
    assert image.current_image(project, project.experiment("hello"), "amd64") == second
    assert len(conversions) == 1


def _edit(path: Path, text: str) -> None:
    path.write_text(text)


CHANGES: dict[str, Callable[[Path], None]] = {
    "Dockerfile": lambda e: _edit(e / "Dockerfile", (e / "Dockerfile").read_text() + "RUN echo more\n"),
    "copied file": lambda e: _edit(e / "hello.sh", "echo changed\n"),
    "file added to a copied folder": lambda e: _edit(e / "data" / "new.txt", "new\n"),
    "file removed from a copied folder": lambda e: (e / "data" / "keep.txt").unlink(),
    "folder with a file added to a copied folder": lambda e: ((e / "data" / "sub").mkdir(),
                                                             _edit(e / "data" / "sub" / "f.txt", "f\n")),
    "copied file became a link": lambda e: ((e / "hello.sh").unlink(), (e / "hello.sh").symlink_to("data/keep.txt")),
    ".dockerignore": lambda e: _edit(e / ".dockerignore", "# nothing ignored now\n"),
    ".dockerignore removed": lambda e: (e / ".dockerignore").unlink(),
    "Dockerfile.dockerignore added": lambda e: _edit(e / "Dockerfile.dockerignore", "data/keep.txt\n"),
    "base image content": lambda e: _edit(e.parents[2] / "base.sif", "other base bytes"),
    "base mapping": lambda e: (_edit(e.parents[2] / "other.sif", "another base"), _edit(
        e.parents[1] / "hpcexp.yaml", f'bases:\n  "busybox:latest": {{sif: "{e.parents[2] / "other.sif"}"}}\n')),
    "build argument": lambda e: _edit(e.parents[1] / "hpcexp.yaml", (e.parents[1] / "hpcexp.yaml").read_text()
                                      + "build_args: {GREETING: hello}\n"),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_every_kind_of_input_change_rebuilds(proj: Path, conversions: list[str], fake_env: dict[str, str],
                                             change: str) -> None:
    first = ensure(proj)
    CHANGES[change](proj / "experiments" / "hello")
    second = ensure(proj)
    assert second.built and second.input_hash != first.input_hash, change
    assert len(conversions) == 2
    builds = [ln for ln in Path(fake_env["FAKE_APPTAINER_LOG"]).read_text().splitlines() if ln.startswith("build")]
    assert len(builds) == 2
    # recorded again: the next run is a cache hit without converting
    third = ensure(proj)
    assert not third.built and third.path == second.path and len(conversions) == 2


NO_REBUILD: dict[str, Callable[[Path], None]] = {
    "Dockerfile comment": lambda e: _edit(e / "Dockerfile", (e / "Dockerfile").read_text() + "# a comment\n"),
    "ignored file added": lambda e: _edit(e / "data" / "more.tmp", "ignored\n"),
    # the input hash counts files; an empty folder is none (as before records existed)
    "empty folder added to a copied folder": lambda e: (e / "data" / "sub").mkdir(),
    "comment in .dockerignore": lambda e: _edit(e / ".dockerignore", "**/*.tmp\n# same rules\n"),
    "converter changed": lambda e: setattr(inputs, "_fingerprint", "another converter"),
    "generated recipe removed": lambda e: (e.parents[1] / "recipes" / "hello.amd64.def").unlink(),
    "record damaged": lambda e: [_edit(p, "{not json") for p in (e.parents[1] / "images" / ".inputs").iterdir()],
}


@pytest.mark.parametrize("change", sorted(NO_REBUILD))
def test_a_change_that_does_not_count_converts_again_but_does_not_rebuild(
        proj: Path, conversions: list[str], monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    monkeypatch.setattr(inputs, "_fingerprint", None)
    first = ensure(proj)
    NO_REBUILD[change](proj / "experiments" / "hello")
    second = ensure(proj)
    assert not second.built and second.path == first.path, change
    assert len(conversions) == 2, "it cannot tell the change does not count without converting"
    assert (proj / "recipes" / "hello.amd64.def").is_file()
    third = ensure(proj)
    assert not third.built and len(conversions) == 2, "recorded again"


def test_changes_the_conversion_never_read_do_not_convert(proj: Path, conversions: list[str]) -> None:
    first = ensure(proj)
    exp = proj / "experiments" / "hello"
    (exp / "notes.md").write_text("not copied\n")          # the context root is not walked: COPY names files
    (proj / "runs" / "hello" / "r1").mkdir(parents=True)   # outside the context
    (exp / "data" / "skip.tmp").write_text("changed, but ignored\n")
    os.utime(exp / "hello.sh", ns=(1, 1))                    # touched: same content (the stat cache hashes it)
    second = ensure(proj)
    assert not second.built and second.path == first.path and len(conversions) == 1


def test_force_rebuilds_whatever_the_record_says(proj: Path, conversions: list[str]) -> None:
    first = ensure(proj)
    again = ensure(proj, force=True)
    assert again.built and again.input_hash == first.input_hash and len(conversions) == 2


def test_a_record_pointing_at_a_missing_or_damaged_image_is_not_trusted(proj: Path, conversions: list[str]) -> None:
    first = ensure(proj)
    first.path.write_text("truncated")
    second = ensure(proj)
    assert second.built and second.path == first.path and len(conversions) == 2
    second.path.unlink()
    third = ensure(proj)
    assert third.built and len(conversions) == 3


def test_clean_removes_the_record_with_its_image(proj: Path, conversions: list[str]) -> None:
    old = ensure(proj)
    (proj / "experiments" / "hello" / "hello.sh").write_text("echo v2\n")
    new = ensure(proj)
    project = load_project(proj)
    layout = Layout(project)
    assert layout.image_inputs(old.path).exists() and layout.image_inputs(new.path).exists()
    orphan = layout.image_inputs_dir() / "gone-amd64-0123456789abcdef.json"
    orphan.write_text("{}")
    report = image.clean(project)
    removed = {Path(p) for p, _ in report.removed}
    assert old.path in removed and layout.image_inputs(old.path) in removed and orphan in removed
    assert not layout.image_inputs(old.path).exists() and not orphan.exists()
    assert layout.image_inputs(new.path).exists() and new.path.exists()


def _imported(stderr: str) -> list[str]:
    return [ln.split("|")[-1].strip() for ln in stderr.splitlines() if ln.startswith("import time:")]


def test_cached_run_in_a_child_process_imports_nothing_of_the_converter(proj: Path, fake_env: dict[str, str]) -> None:
    """`hpcexp run` of a cached image as a user runs it: no spython, no converter, no builder."""
    env = dict(os.environ, **fake_env, PYTHONPATH=str(REPO))
    env.pop("HPCEXP_PROJECT", None)
    first = subprocess.run([sys.executable, "-m", "hpcexp", "run", "-q", "hello"], cwd=proj, env=env,
                           capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    # the first run built the image, so it converted (the check can see those imports)
    assert any(m.startswith("hpcexp.convert") for m in _imported(
        subprocess.run([sys.executable, "-X", "importtime", "-m", "hpcexp", "convert", "hello"], cwd=proj, env=env,
                       capture_output=True, text=True, timeout=120).stderr))
    second = subprocess.run([sys.executable, "-X", "importtime", "-m", "hpcexp", "run", "-q", "hello"], cwd=proj,
                            env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert "fake run" in second.stdout
    mods = _imported(second.stderr)
    assert "hpcexp.build.inputs" in mods and "hpcexp.execute.local.supervisor" in mods
    bad = [m for m in mods if m.split(".")[0] == "spython" or m.startswith(FORBIDDEN[1:])]
    assert not bad, f"a cached run imported {bad}"
    runs = sorted((proj / "runs" / "hello").iterdir())
    recs = [json.loads((d / "run.json").read_text()) for d in runs]
    assert len(recs) == 2 and recs[0]["image"] == recs[1]["image"] and recs[1]["state"] == "succeeded"
    assert recs[1]["input_hash"] == recs[0]["input_hash"]
    assert recs[1]["stop_signal"] == "SIGINT"  # the image's STOPSIGNAL, from the record


def test_cached_ensure_image_in_a_fresh_interpreter_keeps_sys_modules_clean(proj: Path) -> None:
    ensure(proj)
    code = ("import sys\nfrom hpcexp.core.config import load_project\nfrom hpcexp.build import image\n"
            "p = load_project(sys.argv[1])\ninfo = image.ensure_image(p, p.experiment('hello'), 'amd64', pull=True)\n"
            "assert not info.built\n"
            f"bad = [m for m in sys.modules if m == 'spython' or m.startswith({FORBIDDEN!r})]\n"
            "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code, str(proj)], env=dict(os.environ, PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_an_image_recorded_before_this_version_is_found_by_converting(proj: Path, conversions: list[str]) -> None:
    first = ensure(proj)
    shutil.rmtree(proj / "images" / ".inputs")  # as left by a version that kept no records
    second = ensure(proj)
    assert not second.built and second.path == first.path and len(conversions) == 2
    assert Layout(load_project(proj)).image_inputs(first.path).exists()
    ensure(proj)
    assert len(conversions) == 2
