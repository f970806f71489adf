"""Unit tests of hpcexp.archive: fabricated run folders, no Apptainer needed."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import signal
import stat
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from hpcexp import archive
from hpcexp.archive import extract as archive_extract
from hpcexp.archive import writers as archive_writers
from hpcexp.core import runs
from hpcexp.core.config import host_arch, load_project
from hpcexp.core.layout import Layout, RunPaths
from hpcexp.errors import Failure, Interrupted, NotFound, StorageError, UsageError
from hpcexp.infra import atomic
from tests.conftest import assert_clean_error, run_cli

ARCH = host_arch()
IMAGE_SHA = "ab" * 32


# --------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------

@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    (root / "experiments" / "hello").mkdir(parents=True)
    (root / "hpcexp.yaml").write_text("")
    (root / "experiments" / "hello" / "Dockerfile").write_text("FROM busybox:latest\nCMD echo hi\n")
    (root / "recipes").mkdir()
    (root / "recipes" / f"hello.{ARCH}.def").write_text("Bootstrap: localimage\nFrom: busybox.sif\n")
    return root


def layout_of(root: Path) -> Layout:
    return Layout(load_project(root))


def make_run(root: Path, files: dict[str, bytes] | None = None, *, state: str = "succeeded",
             sweep: str | None = None, task: int | None = None, slurm: bool = False) -> RunPaths:
    lay = layout_of(root)
    paths = runs.allocate_run(lay, "hello")
    recipe = lay.recipe("hello", ARCH)
    rec = runs.RunRecord(experiment="hello", run_id=paths.dir.name, state=state, arch=ARCH,
                         image=str(root / "images" / "hello.sif"), image_sha256=IMAGE_SHA,
                         recipe_sha256=hashlib.sha256(recipe.read_bytes()).hexdigest(),
                         sweep_id=sweep, task_index=task, executor="slurm" if slurm else "local",
                         created_at="2026-11-20T10:00:00.000Z")
    runs.write_record(paths, rec)
    paths.stdout.write_text("hello out\n")
    paths.stderr.write_text("")
    if slurm:
        paths.script.write_text("#!/bin/bash\n#SBATCH --job-name=hello\n")
        paths.attempt_stdout(2).write_text("second attempt\n")
    paths.results.mkdir()
    for rel, data in (files or {"result.txt": b"42\n"}).items():
        p = paths.results / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return paths


def members_tar(path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path, "r:gz") as tf:
        return {m.name: m for m in tf.getmembers()}


def read_tar_member(path: Path, name: str) -> bytes:
    with tarfile.open(path, "r:gz") as tf:
        fh = tf.extractfile(name)
        assert fh is not None
        return fh.read()


def all_bytes(path: Path) -> bytes:
    """Every byte an archive holds, decompressed (to grep for canaries)."""
    if path.suffix == ".zip":
        out = b""
        with zipfile.ZipFile(path) as zf:
            for zi in zf.infolist():
                out += zi.filename.encode() + zf.read(zi)
        return out
    return gzip.decompress(path.read_bytes())


def create(root: Path, *specs: str, **kw):
    warnings: list[str] = []
    kw.setdefault("warn", warnings.append)
    result = archive.create_archive(layout_of(root), list(specs), **kw)
    return result, warnings


# --------------------------------------------------------------------------------------
# creating
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_archive_holds_runs_with_manifest_first(project: Path, tmp_path: Path, fmt: str) -> None:
    big = os.urandom(3 * 1024 * 1024 + 17)  # above the one-read limit: the streamed path
    a = make_run(project, {"result.txt": b"42\n", "sub/big.bin": big}, slurm=True)
    time.sleep(1.1)
    b = make_run(project, {"result.txt": b"43\n"})
    out = tmp_path / f"two.{fmt}"
    result, warnings = create(project, a.dir.name, b.dir.name, output=out)
    assert warnings == []
    assert result.path == out and out.exists() and result.format == fmt
    assert result.runs == [f"hello/{a.dir.name}", f"hello/{b.dir.name}"]

    if fmt == "zip":
        with zipfile.ZipFile(out) as zf:
            names = [zi.filename.rstrip("/") for zi in zf.infolist()]
            manifest = json.loads(zf.read("MANIFEST.json"))
            big_back = zf.read(f"hello/{a.dir.name}/results/sub/big.bin")
    else:
        with tarfile.open(out, "r:gz") as tf:
            names = tf.getnames()
        manifest = json.loads(read_tar_member(out, "MANIFEST.json"))
        big_back = read_tar_member(out, f"hello/{a.dir.name}/results/sub/big.bin")
    assert names[0] == "MANIFEST.json"
    assert big_back == big
    pa = f"hello/{a.dir.name}"
    for rel in ("run.json", "stdout.log", "stderr.log", "stdout.2.log", "job.sbatch", "results/result.txt",
                "results/sub/big.bin", f"recipe/hello.{ARCH}.def", "recipe/Dockerfile"):
        assert f"{pa}/{rel}" in names, rel
    assert f"hello/{b.dir.name}/results/result.txt" in names
    # manifest: path, size, sha256 of every file, image sha, version
    assert manifest["format"] == "hpcexp-archive" and manifest["hpcexp_version"]
    assert manifest["image_sha256"] == IMAGE_SHA
    files = {f["path"]: f for f in manifest["files"]}
    assert files[f"{pa}/results/sub/big.bin"]["sha256"] == hashlib.sha256(big).hexdigest()
    assert files[f"{pa}/results/sub/big.bin"]["size"] == len(big)
    assert files[f"{pa}/run.json"]["sha256"] == hashlib.sha256(a.record.read_bytes()).hexdigest()
    assert set(names) - {"MANIFEST.json"} == set(files)
    run_info = {r["run_id"]: r for r in manifest["runs"]}[a.dir.name]
    assert run_info["image_sha256"] == IMAGE_SHA
    assert run_info["recipe"]["matches_record"] is True
    assert run_info["dockerfile"]["source"] == "experiments/hello/Dockerfile"
    assert manifest["totals"]["runs"] == 2

    report = archive.verify_archive(out)
    assert report.ok, report.problems
    assert report.checked == len(files)


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_same_inputs_give_byte_identical_archives(project: Path, tmp_path: Path, fmt: str) -> None:
    paths = make_run(project, {"a.txt": b"a" * 1000, "b/c.txt": b"c"})
    os.chmod(paths.results / "a.txt", 0o640)
    r1, _ = create(project, "hello", output=tmp_path / f"one.{fmt}")
    os.utime(paths.results / "a.txt", (1, 1))  # mtime and umask do not leak into the archive
    r2, _ = create(project, "hello", output=tmp_path / f"two.{fmt}")
    assert r1.path.read_bytes() == r2.path.read_bytes()
    if fmt == "tar.gz":
        raw = r1.path.read_bytes()
        assert raw[4:8] == b"\0\0\0\0"          # gzip header mtime 0
        assert raw[3] & 0x08 == 0               # no file name in the gzip header
        for m in members_tar(r1.path).values():
            assert (m.uid, m.gid, m.uname, m.gname) == (0, 0, "", "")


def test_fast_tar_headers_are_what_tarfile_writes() -> None:
    cases = [("a/b/c.txt", tarfile.REGTYPE, 1234, 0o644, ""), ("d", tarfile.DIRTYPE, 0, 0o755, ""),
             ("l", tarfile.SYMTYPE, 0, 0o777, "../x"), ("x" * 100, tarfile.REGTYPE, 8 ** 11 - 1, 0o755, "")]
    for name, kind, size, mode, link in cases:
        ti = tarfile.TarInfo(name)
        ti.type, ti.size, ti.mode, ti.mtime, ti.linkname = kind, size, mode, 1763776000, link
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        assert archive_writers._ustar_header(name, kind, size, mode, 1763776000, link) == \
            ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"), name
    # what needs pax records goes through tarfile
    assert archive_writers._ustar_header("é", tarfile.REGTYPE, 1, 0o644, 0, "") is None
    assert archive_writers._ustar_header("y" * 101, tarfile.REGTYPE, 1, 0o644, 0, "") is None
    assert archive_writers._ustar_header("big", tarfile.REGTYPE, 8 ** 11, 0o644, 0, "") is None



class _Pipe(io.RawIOBase):
    """A write-only sink that cannot tell or seek, as a pipe or an HTTP response is."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        self.data += b
        return len(b)


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_writers_stream_into_a_sink_that_cannot_seek(tmp_path: Path, fmt: str) -> None:
    """A web server streams an archive into its response: no temporary file, no seek back."""
    small, big = tmp_path / "small.txt", tmp_path / "big.bin"
    small.write_bytes(b"alpha\n")
    big.write_bytes(os.urandom(archive_writers.SMALL * 2))  # larger than SMALL: copied in chunks

    def entry(path: Path, name: str) -> list:
        st = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return ["file", name, str(path), st.st_size, digest, 0o644, st.st_ino, st.st_mtime_ns]

    entries = [["dir", "r"], entry(small, "r/small.txt"), entry(big, "r/big.bin"), ["symlink", "r/link", "small.txt"]]
    manifest = b'{"format": "hpcexp-archive"}\n'
    seekable, pipe = io.BytesIO(), _Pipe()
    for sink in (seekable, pipe):
        archive_writers.write_archive(sink, fmt, 1763776000, io.BytesIO(manifest), len(manifest), entries)
    streamed = bytes(pipe.data)
    if fmt == "tar.gz":
        assert streamed == seekable.getvalue()  # the same bytes whatever the sink
        with tarfile.open(fileobj=io.BytesIO(streamed), mode="r:gz") as tf:
            names = tf.getnames()
            got = tf.extractfile("r/big.bin").read()
            link = tf.getmember("r/link").linkname
    else:
        with zipfile.ZipFile(io.BytesIO(streamed)) as zf:
            assert zf.testzip() is None
            assert all(zi.flag_bits & 0x08 for zi in zf.infolist()), "a stream cannot seek back: data descriptors"
            names = [n.rstrip("/") for n in zf.namelist()]
            got = zf.read("r/big.bin")
            link = zf.read("r/link").decode()
    assert names == ["MANIFEST.json", "r", "r/small.txt", "r/big.bin", "r/link"]
    assert got == big.read_bytes() and link == "small.txt"

def test_runs_are_not_modified(project: Path, tmp_path: Path) -> None:
    paths = make_run(project, {"x.txt": b"x"})

    def snapshot() -> dict[str, tuple[int, int, bytes]]:
        out = {}
        for p in sorted(paths.dir.rglob("*")):
            st = p.lstat()
            out[str(p)] = (st.st_mode, st.st_mtime_ns, p.read_bytes() if p.is_file() else b"")
        return out

    before = snapshot()
    create(project, "hello", output=tmp_path / "a.tar.gz")
    create(project, "hello", output=tmp_path / "a.zip")
    assert snapshot() == before


def test_sweep_and_default_names(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t0 = make_run(project, sweep="sw123", task=0)
    t1 = make_run(project, sweep="sw123", task=1)
    monkeypatch.chdir(tmp_path)
    result, _ = create(project, "sw123")
    assert result.path.parent == tmp_path
    assert result.path.name.startswith("hello-sweep-sw123-") and result.path.name.endswith(".tar.gz")
    assert result.runs == sorted([f"hello/{t0.dir.name}", f"hello/{t1.dir.name}"])
    one, _ = create(project, t0.dir.name, fmt="zip")
    assert one.path.name == f"hello-{t0.dir.name}.zip"
    make_run(project)
    every, _ = create(project, all_runs=True)
    assert every.path.name.startswith("hello-3runs-") and len(every.runs) == 3
    # -o naming an existing folder puts the default name inside it
    (tmp_path / "out").mkdir()
    inside, _ = create(project, t1.dir.name, output=tmp_path / "out")
    assert inside.path == tmp_path / "out" / f"hello-{t1.dir.name}.tar.gz"


def test_format_from_name_and_conflicts() -> None:
    assert archive.format_for(Path("a.zip"), None) == "zip"
    assert archive.format_for(Path("a.tgz"), None) == "tar.gz"
    assert archive.format_for(Path("a.bin"), "zip") == "zip"
    assert archive.format_for(None, None) == "tar.gz"
    with pytest.raises(UsageError, match="does not match"):
        archive.format_for(Path("a.zip"), "tar.gz")


def test_refuses_existing_output_and_output_inside_a_run(project: Path, tmp_path: Path) -> None:
    paths = make_run(project)
    out = tmp_path / "a.tar.gz"
    out.write_text("keep me")
    with pytest.raises(UsageError, match="already exists"):
        create(project, "hello", output=out)
    assert out.read_text() == "keep me"
    result, _ = create(project, "hello", output=out, force=True)
    assert archive.verify_archive(result.path).ok
    with pytest.raises(UsageError, match="inside the run folder"):
        create(project, "hello", output=paths.results / "self.tar.gz")
    assert not (paths.results / "self.tar.gz").exists()


def test_missing_run_is_not_found(project: Path, tmp_path: Path) -> None:
    make_run(project)
    with pytest.raises(NotFound):
        create(project, "nosuchrun", output=tmp_path / "a.tar.gz")
    with pytest.raises(UsageError, match="--all"):
        create(project, output=tmp_path / "a.tar.gz")


# --------------------------------------------------------------------------------------
# links and odd files
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_links_stored_never_followed_and_special_files_skipped(project: Path, tmp_path: Path, fmt: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    canary = tmp_path / "secret" / "id_rsa"
    canary.parent.mkdir()
    canary.write_text("CANARY-7f3a9 private key\n")
    paths = make_run(project, {"ok.txt": b"fine\n"})
    res = paths.results
    os.symlink(canary, res / "k")                     # file outside
    os.symlink(canary.parent, res / "home")           # folder outside
    os.symlink("..", res / "up")                      # the run folder itself (inside)
    os.symlink("ok.txt", res / "inner")               # plain inside link: no warning
    os.symlink("loop2", res / "loop1")
    os.symlink("loop1", res / "loop2")
    os.mkfifo(res / "pipe")
    import socket
    sock = socket.socket(socket.AF_UNIX)
    monkeypatch.chdir(res)  # a relative name: AF_UNIX paths are limited to ~100 bytes
    sock.bind("sock")
    monkeypatch.chdir(tmp_path)
    try:
        result, warnings = create(project, "hello", output=tmp_path / f"a.{fmt}")
    finally:
        sock.close()
    data = all_bytes(result.path)
    assert b"CANARY-7f3a9" not in data
    text = "\n".join(warnings)
    for name in ("results/k", "results/home", "results/loop1", "results/loop2", "results/pipe", "results/sock"):
        assert name in text, name
    assert "results/inner" not in text and "results/up" not in text
    manifest = json.loads(read_tar_member(result.path, "MANIFEST.json") if fmt == "tar.gz"
                          else zipfile.ZipFile(result.path).read("MANIFEST.json"))
    files = {f["path"]: f for f in manifest["files"]}
    prefix = f"hello/{paths.dir.name}/results"
    assert files[f"{prefix}/k"] == {**files[f"{prefix}/k"], "type": "symlink", "target": str(canary)}
    assert files[f"{prefix}/up"]["target"] == ".."
    assert f"{prefix}/pipe" not in files and f"{prefix}/sock" not in files
    assert {s["path"] for s in manifest["skipped"]} == {f"{prefix}/pipe", f"{prefix}/sock"}
    assert archive.verify_archive(result.path).ok


def test_strict_turns_warnings_into_errors(project: Path, tmp_path: Path) -> None:
    paths = make_run(project)
    os.symlink("/etc/passwd", paths.results / "pw")
    out = tmp_path / "a.tar.gz"
    with pytest.raises(UsageError, match="results/pw"):
        create(project, "hello", output=out, strict=True)
    assert not out.exists()
    assert list(tmp_path.glob(".hpcexp-tmp-*")) == []


def test_unreadable_file_is_an_error_unless_skipped(project: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    paths = make_run(project, {"ok.txt": b"ok", "locked.txt": b"secret"})
    locked = str(paths.results / "locked.txt")
    real_open = os.open

    def fake_open(path, flags, *a, **kw):  # as root chmod 000 would not stop us: fake EACCES
        if str(path) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", fake_open)
    out = tmp_path / "a.tar.gz"
    with pytest.raises(UsageError, match="locked.txt") as err:
        create(project, "hello", output=out)
    assert "--skip-unreadable" in (err.value.hint or "")
    assert not out.exists()
    result, warnings = create(project, "hello", output=out, skip_unreadable=True)
    assert any("locked.txt" in w for w in warnings)
    names = members_tar(result.path)
    assert f"hello/{paths.dir.name}/results/ok.txt" in names
    assert f"hello/{paths.dir.name}/results/locked.txt" not in names
    monkeypatch.undo()
    assert archive.verify_archive(result.path).ok


def test_file_changing_between_passes_aborts(project: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    paths = make_run(project, {"grow.txt": b"v1"})

    def rewrite(point: str) -> None:
        if point == "archive.write":  # between the hashing pass and the copy
            (paths.results / "grow.txt").write_bytes(b"v2")  # same size, other content

    monkeypatch.setattr(archive_writers, "fault", rewrite)
    out = tmp_path / "a.zip"
    with pytest.raises(UsageError, match="grow.txt changed while archiving"):
        create(project, "hello", output=out)
    assert not out.exists() and list(tmp_path.glob(".hpcexp-tmp-*")) == []


def test_disk_full_is_storage_error_and_leaves_nothing(project: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    make_run(project)
    monkeypatch.setenv("HPCEXP_TEST_FAULT", "archive.write:enospc")
    out = tmp_path / "a.tar.gz"
    with pytest.raises(StorageError, match="no space left"):
        create(project, "hello", output=out)
    assert not out.exists() and list(tmp_path.glob(".hpcexp-tmp-*")) == []


def test_zip64_when_a_member_needs_it(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(2 * 1024 * 1024 + 5)
    make_run(project, {"big.bin": data})
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 1024 * 1024)  # stand-in for 4 GiB
    result, _ = create(project, "hello", output=tmp_path / "a.zip")
    monkeypatch.undo()
    assert archive.verify_archive(result.path).ok
    with zipfile.ZipFile(result.path) as zf:
        big = [zi for zi in zf.infolist() if zi.filename.endswith("big.bin")][0]
        assert b"\x01\x00" in big.extra[:2]  # zip64 extra field header id 0x0001
        assert zf.read(big) == data


# --------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------

def _rewrite_tar(src: Path, dst: Path, edit) -> None:
    """Re-pack a tar.gz member by member, letting ``edit`` change (name, data) or drop it."""
    with tarfile.open(src, "r:gz") as tin, tarfile.open(dst, "w:gz", format=tarfile.PAX_FORMAT) as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read() if m.isreg() else None
            got = edit(m, data)
            if got is None:
                continue
            m2, data2 = got
            if data2 is not None:
                m2.size = len(data2)
            tout.addfile(m2, io.BytesIO(data2) if data2 is not None else None)


def test_verify_names_a_flipped_byte_missing_and_extra_members(project: Path, tmp_path: Path) -> None:
    paths = make_run(project, {"a.txt": b"alpha\n", "b.txt": b"beta\n"})
    result, _ = create(project, "hello", output=tmp_path / "good.tar.gz")
    prefix = f"hello/{paths.dir.name}/results"

    def flip(m, data):
        if m.name == f"{prefix}/a.txt":
            data = bytes([data[0] ^ 1]) + data[1:]
        return m, data

    _rewrite_tar(result.path, tmp_path / "flipped.tar.gz", flip)
    report = archive.verify_archive(tmp_path / "flipped.tar.gz")
    assert not report.ok
    assert [(p.member, p.kind) for p in report.problems] == [(f"{prefix}/a.txt", "differs")]

    def drop_and_add(m, data):
        if m.name == f"{prefix}/b.txt":
            return None
        if m.name == f"{prefix}/a.txt":
            extra = tarfile.TarInfo(f"{prefix}/intruder.txt")
            return extra, b"not mine"
        return m, data

    _rewrite_tar(result.path, tmp_path / "edited.tar.gz", drop_and_add)
    problems = {(p.member, p.kind) for p in archive.verify_archive(tmp_path / "edited.tar.gz").problems}
    assert (f"{prefix}/b.txt", "missing") in problems
    assert (f"{prefix}/intruder.txt", "extra") in problems
    assert (f"{prefix}/a.txt", "missing") in problems


def test_verify_accepts_a_manifest_in_another_json_layout(project: Path, tmp_path: Path) -> None:
    make_run(project, {"a.txt": b"alpha\n"})
    result, _ = create(project, "hello", output=tmp_path / "good.tar.gz")

    def reindent(m, data):
        if m.name == "MANIFEST.json":
            data = json.dumps(json.loads(data), indent=4).encode()
        return m, data

    _rewrite_tar(result.path, tmp_path / "reindented.tar.gz", reindent)
    report = archive.verify_archive(tmp_path / "reindented.tar.gz")
    assert report.ok and report.checked == archive.verify_archive(result.path).checked > 3


def test_verify_zip_with_flipped_byte_names_member(project: Path, tmp_path: Path) -> None:
    paths = make_run(project, {"data.txt": b"important numbers 1 2 3 4 5\n" * 50})
    result, _ = create(project, "hello", output=tmp_path / "a.zip")
    name = f"hello/{paths.dir.name}/results/data.txt"
    with zipfile.ZipFile(result.path) as zf:
        zi = zf.getinfo(name)
    raw = bytearray(result.path.read_bytes())
    # local header is 30 bytes + name + extra; flip a byte in the middle of the compressed data
    start = zi.header_offset + 30 + len(zi.filename.encode()) + len(zi.extra)
    raw[start + zi.compress_size // 2] ^= 0xFF
    bad = tmp_path / "bad.zip"
    bad.write_bytes(bytes(raw))
    report = archive.verify_archive(bad)
    assert not report.ok
    assert {p.member for p in report.problems} == {name}


def test_verify_rejects_a_non_hpcexp_archive(tmp_path: Path) -> None:
    plain = tmp_path / "plain.tar.gz"
    with tarfile.open(plain, "w:gz") as tf:
        info = tarfile.TarInfo("x.txt")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(Failure, match="MANIFEST.json"):
        archive.verify_archive(plain)
    (tmp_path / "junk.bin").write_bytes(b"hello world")
    with pytest.raises(UsageError, match="not a zip or tar.gz"):
        archive.verify_archive(tmp_path / "junk.bin")
    with pytest.raises(NotFound):
        archive.verify_archive(tmp_path / "nope.zip")


# --------------------------------------------------------------------------------------
# extract
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_extract_round_trip_and_checks_manifest(project: Path, tmp_path: Path, fmt: str) -> None:
    paths = make_run(project, {"a.txt": b"alpha", "d/e/f.bin": os.urandom(2 * 1024 * 1024)})
    os.symlink("a.txt", paths.results / "alias")
    os.chmod(paths.results / "a.txt", 0o755)
    result, _ = create(project, "hello", output=tmp_path / f"a.{fmt}")
    dest = tmp_path / "restored"
    got = archive.extract_archive(result.path, dest)
    assert got.verified and got.path == dest
    back = dest / "hello" / paths.dir.name
    assert (back / "results" / "d" / "e" / "f.bin").read_bytes() == (paths.results / "d/e/f.bin").read_bytes()
    assert os.readlink(back / "results" / "alias") == "a.txt"
    assert os.stat(back / "results" / "a.txt").st_mode & 0o111
    assert (back / "run.json").read_bytes() == paths.record.read_bytes()
    assert (back / "recipe" / "Dockerfile").exists()
    assert list(tmp_path.glob(".hpcexp-tmp-*")) == []
    with pytest.raises(UsageError, match="not empty"):
        archive.extract_archive(result.path, dest)


def _tar_with(path: Path, members: list[tuple[str, str, object]]) -> Path:
    """Build a hostile tar.gz: (name, kind, payload) with kind file|symlink|hardlink|fifo|chr|dir."""
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, payload in members:
            ti = tarfile.TarInfo(name)
            if kind == "file":
                ti.size = len(payload)  # type: ignore[arg-type]
                tf.addfile(ti, io.BytesIO(payload))  # type: ignore[arg-type]
                continue
            ti.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE,
                       "chr": tarfile.CHRTYPE, "dir": tarfile.DIRTYPE}[kind]
            if kind in ("symlink", "hardlink"):
                ti.linkname = str(payload)
            tf.addfile(ti)
    return path


HOSTILE_TARS = {
    "dotdot": ([("ok.txt", "file", b"ok"), ("../x", "file", b"escaped")], "../x"),
    "absolute": ([("/tmp/hpcexp-abs-evil", "file", b"evil")], "/tmp/hpcexp-abs-evil"),
    "link-to-etc": ([("link", "symlink", "/etc"), ("link/passwd", "file", b"root::0:0")], "link"),
    "relative-escape": ([("d/up", "symlink", "../.."), ("ok", "file", b"")], "d/up"),
    "chain-escape": ([("d/s", "symlink", ".."), ("c", "symlink", "d/s/d/s/..")], "c"),
    "write-through-link": ([("sub", "dir", None), ("ln", "symlink", "sub"), ("ln/x", "file", b"x")], "ln/x"),
    "fifo": ([("p", "fifo", None)], "p"),
    "device": ([("dev", "chr", None)], "dev"),
    "hardlink-outside": ([("h", "hardlink", "/etc/passwd")], "h"),
    "duplicate": ([("a", "file", b"1"), ("a", "symlink", "/etc/passwd")], "a"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_TARS))
def test_extract_refuses_hostile_tar(tmp_path: Path, case: str) -> None:
    members, culprit = HOSTILE_TARS[case]
    evil = _tar_with(tmp_path / "evil.tar.gz", members)
    dest = tmp_path / "area" / "dest"
    (tmp_path / "area").mkdir()
    with pytest.raises(UsageError) as err:
        archive.extract_archive(evil, dest)
    assert f"member {culprit}:" in str(err.value)
    assert list((tmp_path / "area").iterdir()) == []          # nothing written, not even DIR
    assert not (tmp_path / "x").exists() and not Path("/tmp/hpcexp-abs-evil").exists()


def test_extract_refuses_zip_slip_and_outside_symlink(tmp_path: Path) -> None:
    slip = tmp_path / "slip.zip"
    with zipfile.ZipFile(slip, "w") as zf:
        zf.writestr("good.txt", b"good")
        zf.writestr("../../evil.txt", b"evil")
    with pytest.raises(UsageError, match=r"member \.\./\.\./evil\.txt: '\.\.'"):
        archive.extract_archive(slip, tmp_path / "d1")
    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as zf:
        zi = zipfile.ZipInfo("etc")
        zi.create_system = 3
        zi.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(zi, "/etc")
        zf.writestr("etc/passwd", b"x")
    with pytest.raises(UsageError, match="member etc: symlink to the absolute path /etc"):
        archive.extract_archive(link, tmp_path / "d2")
    assert not (tmp_path / "d1").exists() and not (tmp_path / "d2").exists()
    assert not (tmp_path / "evil.txt").exists() and not Path("/evil.txt").exists()


def test_extract_can_leave_out_links_to_outside(project: Path, tmp_path: Path) -> None:
    paths = make_run(project, {"a.txt": b"a"})
    os.symlink("/etc/passwd", paths.results / "pw")
    os.symlink("a.txt", paths.results / "alias")
    result, _ = create(project, "hello", output=tmp_path / "a.tar.gz")
    with pytest.raises(UsageError, match="results/pw: symlink to the absolute path"):
        archive.extract_archive(result.path, tmp_path / "d")
    warnings: list[str] = []
    got = archive.extract_archive(result.path, tmp_path / "d", skip_outside_links=True, warn=warnings.append)
    back = got.path / "hello" / paths.dir.name / "results"
    assert not os.path.lexists(back / "pw") and os.readlink(back / "alias") == "a.txt"
    assert any("results/pw" in w for w in warnings)


def test_extract_refuses_tampered_member(project: Path, tmp_path: Path) -> None:
    paths = make_run(project, {"a.txt": b"alpha\n"})
    result, _ = create(project, "hello", output=tmp_path / "good.tar.gz")

    def flip(m, data):
        if m.name.endswith("results/a.txt"):
            data = b"Alpha\n"
        return m, data

    _rewrite_tar(result.path, tmp_path / "bad.tar.gz", flip)
    with pytest.raises(Failure, match="results/a.txt does not match MANIFEST.json"):
        archive.extract_archive(tmp_path / "bad.tar.gz", tmp_path / "d")
    assert not (tmp_path / "d").exists() and list(tmp_path.glob(".hpcexp-tmp-*")) == []
    assert paths.dir.exists()


# --------------------------------------------------------------------------------------
# through the CLI (child processes, as a user runs it)
# --------------------------------------------------------------------------------------

def test_cli_archive_verify_extract_exit_codes(project: Path, tmp_path: Path) -> None:
    paths = make_run(project, {"a.txt": b"alpha\n"})
    out = tmp_path / "a.tar.gz"
    proc = run_cli("archive", "hello", "-o", str(out), "--json", cwd=project)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["path"] == str(out) and summary["files"] >= 4 and summary["runs"] == [f"hello/{paths.dir.name}"]
    proc = run_cli("archive", "--verify", str(out))
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr

    def flip(m, data):
        return (m, b"Alpha\n") if m.name.endswith("results/a.txt") else (m, data)

    _rewrite_tar(out, tmp_path / "bad.tar.gz", flip)
    proc = run_cli("archive", "--verify", str(tmp_path / "bad.tar.gz"))
    assert_clean_error(proc, 1, f"hello/{paths.dir.name}/results/a.txt", "differs")

    evil = _tar_with(tmp_path / "evil.tar.gz", [("../x", "file", b"x")])
    proc = run_cli("extract", str(evil), str(tmp_path / "d"))
    assert_clean_error(proc, 2, "../x")
    assert not (tmp_path / "x").exists()

    proc = run_cli("archive", "nosuchrun", cwd=project)
    assert_clean_error(proc, 2, "nosuchrun")
    proc = run_cli("archive", "--verify", str(out), "hello", cwd=project)
    assert_clean_error(proc, 2, "--verify")


# SIGTERM (kill, scancel, a job's time limit) while archiving: on every Python version, one
# error line and exit 130, no traceback and no "Exception ignored" from a stream finalised
# after its file was closed, no archive and no temporary file, the run untouched. The child
# runs with -X dev, which makes every interpreter report what Python 3.13 reports by default
# (errors in IOBase finalisers) and adds ResourceWarnings for anything left open.

SIGTERM_POINTS = ["archive.scan", "archive.write", "archive.member", "archive.close", "archive.publish"]


def _archive_child(project: Path, out: Path, **env_extra: str) -> subprocess.Popen[str]:
    repo = str(Path(__file__).resolve().parent.parent)
    pythonpath = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=pythonpath, **env_extra)
    env.pop("HPCEXP_PROJECT", None)
    return subprocess.Popen([sys.executable, "-X", "dev", "-m", "hpcexp", "archive", "hello", "-o", str(out)],
                            cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_interrupted_cleanly(child: subprocess.Popen[str], err: str, out: Path, run_dir: Path,
                                before: dict[str, bytes]) -> None:
    assert child.returncode == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0] == f"hpcexp: error: interrupted while writing {out}; no archive was written", err
    assert not out.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == [], "a temporary file was left behind"
    assert _tree(run_dir) == before, "the run folder was modified"


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
@pytest.mark.parametrize("point", SIGTERM_POINTS)
def test_cli_sigterm_at_each_point_leaves_no_archive(project: Path, tmp_path: Path, fmt: str, point: str) -> None:
    # big.bin is larger than SMALL, so it is copied in chunks and archive.member is reached
    paths = make_run(project, {"a.txt": b"alpha\n", "big.bin": os.urandom(archive.SMALL * 3)})
    before = _tree(paths.dir)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / f"a.{fmt}"
    child = _archive_child(project, out, HPCEXP_TEST_FAULT=f"{point}:sigterm")
    try:
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    _assert_interrupted_cleanly(child, err, out, paths.dir, before)


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
@pytest.mark.parametrize("when", ["paused", "mid-stream"])
def test_cli_sigterm_from_outside_leaves_no_archive(project: Path, tmp_path: Path, fmt: str, when: str) -> None:
    """A real SIGTERM from another process: while paused after the manifest, or at whatever
    instruction the writer is on while it compresses a large file (no fault hook at all)."""
    if when == "paused":
        paths = make_run(project, {"a.txt": b"alpha\n"})
        env = {"HPCEXP_TEST_FAULT": "archive.write:sleep", "HPCEXP_TEST_FAULT_SECONDS": "60"}
        started = 0        # the temporary file exists (gzip may not have flushed a byte yet)
    else:
        # ~1 s of deflate here; the signal comes once the first MiB of the big member is out
        paths = make_run(project, {"big.bin": os.urandom(32 << 20)})
        env = {}
        started = 1 << 20
    before = _tree(paths.dir)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / f"a.{fmt}"
    child = _archive_child(project, out, **env)
    try:
        deadline = time.monotonic() + 60
        while True:
            tmp = list(out_dir.glob(f".hpcexp-tmp-*a.{fmt}"))
            try:
                if tmp and tmp[0].stat().st_size >= started:
                    break
            except FileNotFoundError:
                pass
            assert child.poll() is None, ("the archive finished before the signal", child.communicate())
            assert time.monotonic() < deadline, "the archive never started writing"
            time.sleep(0.005)
        if when == "paused":
            time.sleep(0.3)  # into the pause, past the instant the temporary file is created
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    _assert_interrupted_cleanly(child, err, out, paths.dir, before)


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_second_sigterm_does_not_interrupt_the_clean_up(project: Path, tmp_path: Path, fmt: str) -> None:
    """kill twice in a row (or scancel, then the time limit): the second SIGTERM comes while the
    first is being cleaned up, and the clean-up still completes."""
    paths = make_run(project, {"a.txt": b"alpha\n", "big.bin": os.urandom(archive.SMALL * 3)})
    before = _tree(paths.dir)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / f"a.{fmt}"
    child = _archive_child(project, out, HPCEXP_TEST_FAULT="archive.member:sigterm,archive.abort:sigterm")
    try:
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    _assert_interrupted_cleanly(child, err, out, paths.dir, before)


def test_interrupt_after_publishing_keeps_the_complete_archive(project: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    make_run(project)
    out = tmp_path / "a.tar.gz"
    real_fsync_dir = atomic.fsync_dir

    def interrupted_after_rename(path: Path) -> None:
        real_fsync_dir(path)
        if out.exists():
            raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "fsync_dir", interrupted_after_rename)
    with pytest.raises(Interrupted, match="was complete; it is kept"):
        create(project, "hello", output=out)
    monkeypatch.undo()
    assert archive.verify_archive(out).ok
    assert list(tmp_path.glob(".hpcexp-tmp-*")) == []


def test_interrupt_with_force_leaves_the_old_archive(project: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    make_run(project)
    out = tmp_path / "a.tar.gz"
    out.write_bytes(b"old")

    def interrupt(point: str) -> None:
        if point == "archive.close":
            raise KeyboardInterrupt

    monkeypatch.setattr(archive_writers, "fault", interrupt)
    with pytest.raises(Interrupted, match="no archive was written .the existing file is unchanged"):
        create(project, "hello", output=out, force=True)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.gz", "proj"]


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_hostile_and_odd_file_names_round_trip(project: Path, tmp_path: Path, fmt: str) -> None:
    from tests.conftest import HOSTILE_VALUES

    names = [v for v in HOSTILE_VALUES if "/" not in v] + ["new\nline", "tab\there", "x" * 200, "-rf"]
    paths = make_run(project, {name: name.encode() for name in names})
    bad = os.fsencode(str(paths.results)) + b"/latin1-\xe9t\xe9"
    with open(bad, "wb") as fh:
        fh.write(b"not utf-8 named")
    result, warnings = create(project, "hello", output=tmp_path / f"a.{fmt}")
    assert any("not valid UTF-8" in w and "\n" not in w for w in warnings)
    assert archive.verify_archive(result.path).ok
    got = archive.extract_archive(result.path, tmp_path / "back")
    back = got.path / "hello" / paths.dir.name / "results"
    for name in names:
        assert (back / name).read_bytes() == name.encode(), name
    assert not Path("/tmp/hpcexp-pwned").exists()


class _FullDisk:
    """The temporary archive file on a disk that fills up after ``limit`` bytes."""

    def __init__(self, raw, limit: int) -> None:
        self.raw, self.limit, self.closed = raw, limit, False

    def write(self, data) -> int:
        if self.closed:
            raise ValueError("write to closed file")
        if self.raw.tell() + len(data) > self.limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.raw.write(data)

    def __getattr__(self, name: str):
        if self.closed:
            raise ValueError(f"{name} on a closed file")
        return getattr(self.raw, name)


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_disk_filling_up_mid_stream_leaves_no_stream_writing_later(project: Path, tmp_path: Path, fmt: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The write itself fails (so closing the gzip or zip stream fails again): nothing may
    write into the file once it is closed, now or when the garbage collector runs."""
    import contextlib
    import gc

    make_run(project, {"big.bin": os.urandom(archive.SMALL * 4)})
    real_open = atomic.atomic_open

    @contextlib.contextmanager
    def full_disk(final, mode="wb", **kw):
        disk = None
        try:
            with real_open(final, mode, **kw) as raw:
                disk = _FullDisk(raw, limit=archive.SMALL * 2)
                yield disk
        finally:
            if disk is not None:
                disk.closed = True

    monkeypatch.setattr(atomic, "atomic_open", full_disk)
    gc.collect()
    unraisable: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    out = tmp_path / f"a.{fmt}"
    with pytest.raises(StorageError, match="no space left"):
        create(project, "hello", output=out)
    gc.collect()
    assert unraisable == []
    assert not out.exists() and list(tmp_path.glob(".hpcexp-tmp-*")) == []


def test_interrupted_extract_leaves_nothing(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_run(project, {"a.txt": b"alpha\n", "b.txt": b"beta\n"})
    result, _ = create(project, "hello", output=tmp_path / "a.zip")
    calls = []

    def interrupt_second(m, target):
        calls.append(m.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(m, target)

    real = archive_extract._write_member
    monkeypatch.setattr(archive_extract, "_write_member", interrupt_second)
    dest = tmp_path / "back"
    with pytest.raises(Interrupted, match=f"interrupted while extracting into {dest}; nothing was written"):
        archive.extract_archive(result.path, dest)
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip", "proj"]
