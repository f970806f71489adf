"""Hostile or unlucky input: one bad file, ref or user never takes the rest down.

Each class of damage is tried through the real CLI (a child ``python -m hpcexp``, as the
ordinary test user under scripts/run-tests): the exit code, exactly one error line and
no traceback, every other run still listed, and nothing changed in the project or
beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Iterator

import pytest
from conftest import assert_clean_error, run_cli

from hpcexp.core import runs
from hpcexp.core.layout import RunPaths
from hpcexp.infra import host as hostinfo

GOOD = ("20260101-000000.000-aaaaa1", "20260101-000000.000-ccccc3")
BAD = "20260101-000000.000-bbbbb2"


def snapshot(root: Path) -> dict[str, tuple[str, str]]:
    """Every entry below ``root``: its kind and content digest (links by target), not followed."""
    out: dict[str, tuple[str, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                try:
                    with open(p, "rb") as fh:
                        out[rel] = ("file", hashlib.sha256(fh.read()).hexdigest())
                except PermissionError:
                    out[rel] = ("file", f"unreadable {st.st_size} {st.st_mtime_ns}")
            else:
                out[rel] = (stat.filemode(st.st_mode)[0], "")
    return out


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("hpcexp: error:")]


def one_error(proc, code: int, *needles: str) -> str:
    """Exit ``code``, exactly one error line holding every needle, no traceback."""
    assert_clean_error(proc, code, *needles)
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert len(lines[0]) < 600, lines[0]
    return lines[0]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    (root / "experiments" / "hello").mkdir(parents=True)
    (root / "hpcexp.yaml").write_text("{}\n")
    (root / "experiments" / "hello" / "Dockerfile").write_text("FROM busybox:latest\n")
    for i, run_id in enumerate((GOOD[0], BAD, GOOD[1])):
        paths = RunPaths(root / "runs" / "hello" / run_id)
        paths.dir.mkdir(parents=True)
        rec = runs.RunRecord(experiment="hello", run_id=run_id, state="succeeded", exit_code=0,
                             executor="local")
        rec.created_at = f"2026-01-0{i + 1}T00:00:00.000Z"
        runs.write_record(paths, rec)
        paths.stdout.write_text(f"output of {run_id}\n")
    return root


def _damage(record: Path, kind: str, elsewhere: Path) -> None:
    """Turn run.json into one kind of damaged record."""
    good = json.loads(record.read_text())
    record.unlink()
    if kind == "directory":
        record.mkdir()
    elif kind == "fifo":
        os.mkfifo(record)
    elif kind == "symlink":
        secret = elsewhere / "secret.json"
        secret.write_text(json.dumps({**good, "reason": "TOP-SECRET"}))
        record.symlink_to(secret)
    elif kind == "unreadable":
        record.write_text(json.dumps(good))
        record.chmod(0)
    elif kind == "deep":
        record.write_text("[" * 200_000 + "]" * 200_000)
    elif kind == "wrong-types":
        record.write_text(json.dumps({**good, "params": ["a"], "executor_ids": {"supervisor_pid": "x"}}))
    elif kind == "wrong-state":
        record.write_text(json.dumps({**good, "state": {"x": 1}}))
    elif kind == "not-object":
        record.write_text("[1, 2, 3]")
    elif kind == "not-json":
        record.write_bytes(b"\xff\xfe{garbage")
    elif kind == "huge":
        with open(record, "wb") as fh:
            fh.truncate(runs.MAX_RECORD_BYTES + 1)
    elif kind == "other-run":
        record.write_text(json.dumps({**good, "run_id": GOOD[0]}))
    else:  # pragma: no cover
        raise AssertionError(kind)


KINDS = ["directory", "fifo", "symlink", "unreadable", "deep", "wrong-types", "wrong-state", "not-object",
         "not-json", "huge", "other-run"]


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_record_hides_no_other_run(project: Path, tmp_path: Path, kind: str) -> None:
    if kind == "unreadable" and os.geteuid() == 0:
        pytest.skip("root reads any file")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    record = project / "runs" / "hello" / BAD / "run.json"
    _damage(record, kind, elsewhere)
    before, outside = snapshot(project), snapshot(tmp_path)

    proc = run_cli("runs", cwd=project, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    assert set(rows) == {*GOOD, BAD}, proc.stdout
    assert all(" succeeded " in rows[g] for g in GOOD)
    assert " unknown " in rows[BAD]
    assert str(record) in proc.stderr and "damaged" in proc.stderr
    assert "TOP-SECRET" not in proc.stdout + proc.stderr
    assert "cannot write" not in proc.stderr

    proc = run_cli("status", "--json", cwd=project, timeout=60)
    assert proc.returncode == 0, proc.stderr
    data = {d["run_id"]: d for d in json.loads(proc.stdout)}
    assert set(data) == {*GOOD, BAD}
    assert {frozenset(d) for d in data.values()} == {frozenset(data[GOOD[0]])}, "same shape for every run"
    assert data[BAD]["state"] == "unknown" and str(record) in data[BAD]["error"]
    assert all(data[g]["error"] is None and data[g]["state"] == "succeeded" for g in GOOD)
    if kind == "unreadable":
        assert "cannot read" in data[BAD]["error"]

    proc = run_cli("status", BAD, cwd=project, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "state: unknown" in proc.stdout and str(record) in proc.stdout

    proc = run_cli("logs", GOOD[1], cwd=project, timeout=60)
    assert proc.returncode == 0 and proc.stdout == f"output of {GOOD[1]}\n", proc.stderr

    proc = run_cli("stop", BAD, cwd=project, timeout=60)
    one_error(proc, 2, "damaged", str(record))

    out = tmp_path / "out.tar.gz"
    skip = ["--skip-unreadable"] if kind == "unreadable" else []  # else refused, as for any unreadable file
    proc = run_cli("archive", "--all", *skip, "-o", str(out), cwd=project, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert str(record) in proc.stderr
    out.unlink()
    assert snapshot(project) == before
    assert snapshot(tmp_path) == outside


def test_symlinked_run_folder_is_listed_not_followed(project: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside-run"
    outside.mkdir()
    (outside / "run.json").write_text(json.dumps({"experiment": "hello", "run_id": "x", "state": "succeeded"}))
    (project / "runs" / "hello" / "20260101-000000.000-ddddd4").symlink_to(outside)
    proc = run_cli("status", "--json", cwd=project, timeout=60)
    assert proc.returncode == 0, proc.stderr
    data = {d["run_id"]: d for d in json.loads(proc.stdout)}
    assert data["20260101-000000.000-ddddd4"]["state"] == "unknown"
    assert "symbolic link" in data["20260101-000000.000-ddddd4"]["error"]
    assert all(data[g]["state"] == "succeeded" for g in GOOD)


def test_fifo_stop_request_and_logs_do_not_block(project: Path) -> None:
    """Special files planted beside a record: no read ever blocks on them."""
    run_dir = project / "runs" / "hello" / GOOD[0]
    (run_dir / "stdout.log").unlink()
    os.mkfifo(run_dir / "stdout.log")
    os.mkfifo(run_dir / "stop.json")
    proc = run_cli("logs", GOOD[0], cwd=project, timeout=30)
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr
    from hpcexp.execute.local.supervisor import _read_stop_request

    assert _read_stop_request(RunPaths(run_dir)) == {}


BAD_REFS = ["x" * 5000, "a/b", "../hello", "-rf", ".hidden", "a\nb", "a\x00b", "a b", "ä", "*", "@lastx", ""]


@pytest.mark.parametrize("ref", BAD_REFS, ids=lambda r: repr(r[:12]))
@pytest.mark.parametrize("command", [["status"], ["logs"], ["stop"], ["archive", "-o", "x.tar.gz"]])
def test_refs_are_checked_like_names_before_the_disk(project: Path, tmp_path: Path, command: list[str],
                                                     ref: str) -> None:
    if "\x00" in ref:  # no process can receive a NUL in its argv: check the library call instead
        from hpcexp.core.config import load_project
        from hpcexp.core.layout import Layout
        from hpcexp.errors import UsageError

        with pytest.raises(UsageError, match="invalid run reference"):
            runs.resolve(Layout(load_project(explicit=str(project))), ref)
        return
    before, outside = snapshot(project), snapshot(tmp_path)
    proc = run_cli(*command, "--", ref, cwd=project, timeout=60)
    line = one_error(proc, 2, "invalid run reference")
    assert len(line) < 400, line
    assert snapshot(project) == before and snapshot(tmp_path) == outside


def test_good_refs_still_resolve(project: Path) -> None:
    for ref in ("@last", "hello", GOOD[0], GOOD[0][:-2]):
        proc = run_cli("status", ref, cwd=project, timeout=60)
        assert proc.returncode == 0, (ref, proc.stderr)


def test_every_long_message_is_clipped() -> None:
    from hpcexp.errors import MAX_LINE_CHARS, clip_line, shown

    assert len(shown("y" * 10_000)) < 120 and "10000 characters" in shown("y" * 10_000)
    assert shown("short") == "'short'"
    assert len(clip_line("z" * 50_000)) < MAX_LINE_CHARS + 40


def _archive_bytes(path: Path) -> tuple[bytes, dict[str, str]]:
    """Every member's content concatenated, and member name -> kind/link target."""
    import tarfile
    import zipfile

    blob, names = b"", {}
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            for zi in zf.infolist():
                data = zf.read(zi)
                blob += data
                is_link = stat.S_ISLNK(zi.external_attr >> 16)
                names[zi.filename] = f"link:{data.decode()}" if is_link else "file"
    else:
        with tarfile.open(path) as tf:
            for ti in tf.getmembers():
                if ti.isfile():
                    blob += tf.extractfile(ti).read()  # type: ignore[union-attr]
                names[ti.name] = f"link:{ti.linkname}" if ti.issym() else ti.type.decode()
    return blob, names


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_nothing_outside_the_project_reaches_an_archive(project: Path, tmp_path: Path, fmt: str) -> None:
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE-KEY-MATERIAL\n")
    (project / "recipes").mkdir()
    from hpcexp.core.config import host_arch

    (project / "recipes" / f"hello.{host_arch()}.def").symlink_to(secret)
    dockerfile = project / "experiments" / "hello" / "Dockerfile"
    dockerfile.unlink()
    dockerfile.symlink_to(secret)
    results = project / "runs" / "hello" / GOOD[0] / "results"
    results.mkdir()
    (results / "key").symlink_to(secret)
    (results / "fine.txt").write_text("result\n")
    (results / "inside").symlink_to("fine.txt")
    before, outside = snapshot(project), snapshot(tmp_path)
    out = tmp_path / f"a.{fmt}"
    proc = run_cli("archive", GOOD[0], "-o", str(out), cwd=project, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "leads outside the project" in proc.stderr  # the recipe
    blob, names = _archive_bytes(out)
    assert b"PRIVATE-KEY-MATERIAL" not in blob
    prefix = f"hello/{GOOD[0]}"
    assert names[f"{prefix}/results/key"] == f"link:{secret}"  # stored as a link, never read
    assert names[f"{prefix}/results/inside"] == "link:fine.txt"
    assert [n for n in names if n.startswith(f"{prefix}/recipe/") and not n.endswith("/")
            and names[n] in ("file", "0")] == []
    # --strict turns the refusal into an error: one line, no archive left behind
    out.unlink()
    proc = run_cli("archive", GOOD[0], "--strict", "-o", str(out), cwd=project, timeout=120)
    one_error(proc, 2 if proc.returncode == 2 else 1)
    assert not out.exists()
    assert snapshot(project) == before and snapshot(tmp_path) == outside


def test_a_recipe_link_inside_the_project_is_still_archived(project: Path, tmp_path: Path) -> None:
    (project / "recipes").mkdir()
    real = project / "recipes" / "shared.def"
    real.write_text("Bootstrap: docker\nFrom: busybox\n")
    from hpcexp.core.config import host_arch

    (project / "recipes" / f"hello.{host_arch()}.def").symlink_to("shared.def")
    out = tmp_path / "b.tar.gz"
    proc = run_cli("archive", GOOD[0], "-o", str(out), cwd=project, timeout=120)
    assert proc.returncode == 0, proc.stderr
    blob, names = _archive_bytes(out)
    assert b"From: busybox" in blob
    assert names[f"hello/{GOOD[0]}/recipe/hello.{host_arch()}.def"] == "0"


SECRET = "ssh-rsa AAAAB3NzaSECRETKEY user@host"


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    p = tmp_path / "private" / "id_rsa"
    p.parent.mkdir()
    p.write_text(f"{SECRET}\nsecond line\n")
    return p


def _no_secret(proc) -> None:
    assert "SECRETKEY" not in proc.stdout + proc.stderr and "ssh-rsa" not in proc.stderr, proc.stderr


def test_dockerfile_linked_out_of_the_project_is_refused_unread(project: Path, tmp_path: Path,
                                                                 secret_file: Path) -> None:
    dockerfile = project / "experiments" / "hello" / "Dockerfile"
    dockerfile.unlink()
    dockerfile.symlink_to(secret_file)
    before, outside = snapshot(project), snapshot(tmp_path)
    for command in (["convert", "hello"], ["build", "hello"], ["run", "hello"], ["submit", "hello", "--dry-run"]):
        proc = run_cli(*command, cwd=project, timeout=120)
        one_error(proc, 2, "leads outside the project", str(dockerfile))
        _no_secret(proc)
    assert snapshot(project) == before and snapshot(tmp_path) == outside


def test_a_dockerfile_link_inside_the_project_still_converts(project: Path) -> None:
    shared = project / "common.Dockerfile"
    shared.write_text("FROM busybox:latest\nRUN true\n")
    dockerfile = project / "experiments" / "hello" / "Dockerfile"
    dockerfile.unlink()
    dockerfile.symlink_to(shared)
    proc = run_cli("convert", "hello", cwd=project, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_explicit_non_dockerfile_is_not_quoted(project: Path, secret_file: Path) -> None:
    proc = run_cli("convert", "--dockerfile", str(secret_file), "-o", "-", cwd=project, timeout=60)
    one_error(proc, 2, "not a Dockerfile instruction")
    _no_secret(proc)
    typo = project / "typo.Dockerfile"
    typo.write_text("FORM busybox\n")
    proc = run_cli("convert", "--dockerfile", str(typo), "-o", "-", cwd=project, timeout=60)
    one_error(proc, 2, "unknown instruction 'FORM'")  # a plausible misspelling is still named


def test_dockerignore_linked_out_is_refused(project: Path, secret_file: Path) -> None:
    (project / "experiments" / "hello" / ".dockerignore").symlink_to(secret_file)
    (project / "experiments" / "hello" / "Dockerfile").write_text("FROM busybox:latest\nCOPY . /app\n")
    proc = run_cli("convert", "hello", cwd=project, timeout=60)
    one_error(proc, 2, ".dockerignore", "outside the build context")
    _no_secret(proc)
    assert not (project / "recipes").exists()


def test_config_linked_out_of_the_project_is_refused(project: Path, tmp_path: Path, secret_file: Path) -> None:
    cfg = project / "hpcexp.yaml"
    cfg.unlink()
    cfg.symlink_to(secret_file)
    for command in (["list"], ["runs"]):
        proc = run_cli(*command, cwd=project, timeout=60)
        one_error(proc, 2, "hpcexp.yaml", "outside")
        _no_secret(proc)


@pytest.mark.parametrize("special", ["fifo", "dir"])
def test_config_that_is_a_special_file_never_blocks(project: Path, special: str) -> None:
    cfg = project / "hpcexp.yaml"
    cfg.unlink()
    os.mkfifo(cfg) if special == "fifo" else cfg.mkdir()
    proc = run_cli("list", cwd=project, timeout=30)
    one_error(proc, 2, "hpcexp.yaml")


@pytest.mark.parametrize("suffix", [".yaml", ".csv"])
def test_sweep_file_linked_out_is_refused(project: Path, tmp_path: Path, secret_file: Path, suffix: str) -> None:
    link = project / f"sweep{suffix}"
    link.symlink_to(secret_file)
    before = snapshot(project)
    proc = run_cli("submit", "hello", "--sweep-file", str(link), "--dry-run", cwd=project, timeout=60)
    one_error(proc, 2, "outside")
    _no_secret(proc)
    assert snapshot(project) == before


def test_experiment_folder_leading_out_is_refused_unless_allowed(project: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere-exp"
    elsewhere.mkdir()
    (elsewhere / "Dockerfile").write_text("FROM busybox:latest\n")
    (project / "experiments" / "away").symlink_to(elsewhere)
    before, outside = snapshot(project), snapshot(tmp_path)
    for command in (["convert", "away"], ["build", "away"], ["run", "away"], ["submit", "away", "--dry-run"]):
        proc = run_cli(*command, cwd=project, timeout=120)
        one_error(proc, 2, "outside the project", "allow_outside_project")
    assert snapshot(project) == before and snapshot(tmp_path) == outside
    proc = run_cli("runs", cwd=project, timeout=60)  # the other experiments are unaffected
    assert proc.returncode == 0, proc.stderr
    (project / "hpcexp.yaml").write_text("experiments:\n  away:\n    allow_outside_project: true\n")
    proc = run_cli("convert", "away", cwd=project, timeout=120)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------------------
# extraction edge cases (the real `hpcexp extract`)
# --------------------------------------------------------------------------------------

def _tar_with(path: Path, names: list[str], data: bytes = b"x") -> Path:
    import io
    import tarfile

    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tf:
        for name in names:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return path


def _zeros_zip(path: Path, size: int) -> Path:
    import zipfile

    chunk = b"\0" * (1 << 20)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("zeros.bin", "w", force_zip64=True) as fh:
            for _ in range(size // len(chunk)):
                fh.write(chunk)
    return path


def _no_debris(folder: Path) -> None:
    left = [p.name for p in folder.iterdir() if p.name.startswith(".hpcexp-tmp-")]
    assert left == [], left


@pytest.mark.parametrize("case", ["deep", "long-name", "long-component"])
def test_extract_refuses_unbounded_member_paths(tmp_path: Path, case: str) -> None:
    names = {"deep": ["a/" * 3000 + "f"], "long-name": ["/".join(["d" * 200] * 40) + "/f"],
             "long-component": ["ok.txt", "x" * 300]}[case]
    archive = _tar_with(tmp_path / "bad.tar.gz", names)
    dest_parent = tmp_path / "out"
    dest_parent.mkdir()
    before = snapshot(tmp_path)
    proc = run_cli("extract", str(archive), str(dest_parent / "dest"), cwd=tmp_path, timeout=120)
    line = one_error(proc, 2, "refusing to extract")
    assert "RecursionError" not in proc.stderr and len(line) < 600
    _no_debris(dest_parent)
    assert snapshot(tmp_path) == before


def test_extract_refuses_a_zip_bomb_unless_allowed(tmp_path: Path) -> None:
    archive = _zeros_zip(tmp_path / "zeros.zip", 80 << 20)
    assert archive.stat().st_size < 1 << 20
    before = snapshot(tmp_path)
    proc = run_cli("extract", str(archive), str(tmp_path / "dest"), cwd=tmp_path, timeout=120)
    one_error(proc, 2, "ratio")
    _no_debris(tmp_path)
    assert snapshot(tmp_path) == before
    proc = run_cli("extract", "--allow-large", str(archive), str(tmp_path / "dest"), cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "dest" / "zeros.bin").stat().st_size == 80 << 20


def test_extract_total_size_limit(tmp_path: Path) -> None:
    import os as _os

    archive = _tar_with(tmp_path / "big.tar.gz", ["a.bin", "b.bin"], data=_os.urandom(600 << 10))
    proc = run_cli("extract", "--max-size", "1M", str(archive), str(tmp_path / "dest"), cwd=tmp_path, timeout=60)
    one_error(proc, 2, "more than 1.0 MiB", "--max-size")
    assert not (tmp_path / "dest").exists()
    _no_debris(tmp_path)
    proc = run_cli("extract", "--max-size", "lots", str(archive), str(tmp_path / "dest"), cwd=tmp_path)
    one_error(proc, 2, "invalid size")
    proc = run_cli("extract", "--max-size", "2M", str(archive), str(tmp_path / "dest"), cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_failed_extraction_cleans_a_tree_deeper_than_the_stack(tmp_path: Path) -> None:
    from hpcexp.archive import _remove_tree

    top = tmp_path / ".hpcexp-tmp-x"
    top.mkdir()
    try:
        fd = os.open(top, os.O_RDONLY)
        try:
            for _ in range(3000):  # deeper than PATH_MAX allows by name, and than Python's recursion limit
                os.mkdir("d", dir_fd=fd)
                nfd = os.open("d", os.O_RDONLY, dir_fd=fd)
                with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=nfd), "w") as fh:
                    fh.write("x")
                os.close(fd)
                fd = nfd
        finally:
            os.close(fd)
        _remove_tree(str(top))
        assert not top.exists()
    finally:  # never leave a tree pytest's own (recursive) cleanup cannot remove
        if top.exists():
            import subprocess

            subprocess.run(["rm", "-rf", str(top)], check=False)


# --------------------------------------------------------------------------------------
# another user's run on a group-shared project (the real second user, hpcexp-ci2)
# --------------------------------------------------------------------------------------

SECOND_USER = os.environ.get("HPCEXP_SECOND_USER", "hpcexp-ci2")


def _as_second(script: str, input: str | None = None) -> str:
    import subprocess

    proc = subprocess.run(["sudo", "-n", "-u", SECOND_USER, "/bin/sh", "-c", script], input=input,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture
def shared_project() -> Iterator[tuple[Path, str]]:
    """A project folder shared by the test user's group with SECOND_USER (setgid, 2770)."""
    import grp
    import shutil
    import subprocess
    import tempfile

    if os.geteuid() == 0:
        pytest.skip("must run as the ordinary test user")
    probe = subprocess.run(["sudo", "-n", "-u", SECOND_USER, "true"], capture_output=True, text=True) \
        if shutil.which("sudo") else None
    if probe is None or probe.returncode != 0:
        msg = f"cannot run commands as {SECOND_USER} (scripts/provision-test-env sets that up)"
        pytest.fail(msg) if os.environ.get("HPCEXP_E2E_REQUIRED") == "1" else pytest.skip(msg)
    import pwd

    second_groups = {g.gr_gid for g in grp.getgrall() if SECOND_USER in g.gr_mem}
    shared_gid = next(iter(second_groups & set(os.getgroups())), None)
    assert shared_gid is not None, f"{SECOND_USER} shares no group with {pwd.getpwuid(os.getuid()).pw_name}"
    root = Path(tempfile.mkdtemp(prefix="hpcexp-shared-", dir="/tmp"))
    try:
        os.chown(root, -1, shared_gid)
        root.chmod(0o2770)
        (root / "experiments" / "hello").mkdir(parents=True)
        (root / "hpcexp.yaml").write_text("{}\n")
        (root / "experiments" / "hello" / "Dockerfile").write_text("FROM busybox:latest\n")
        for d in (root / "runs", root / "runs" / "hello"):
            d.mkdir()
            d.chmod(0o2770)
        yield root, SECOND_USER
    finally:
        _as_second(f"find {root}/runs -user {SECOND_USER} -depth -exec rm -rf {{}} + 2>/dev/null; true")
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.e2e
def test_stop_of_another_users_run_is_refused_at_once(shared_project: tuple[Path, str]) -> None:
    import time

    root, other = shared_project
    pid = int(_as_second("sleep 300 </dev/null >/dev/null 2>&1 & echo $!").strip())
    try:
        run_id = "20260101-000000.000-0f0f0f"
        rec = runs.RunRecord(experiment="hello", run_id=run_id, state="running", user=other,
                             executor_ids={"supervisor_pid": pid, "supervisor_start": hostinfo.pid_start_ticks(pid),
                                           "host": hostinfo.hostname(), "boot_id": hostinfo.boot_id()})
        run_dir = root / "runs" / "hello" / run_id
        _as_second(f"umask 007; mkdir {run_dir} && cat > {run_dir}/run.json", input=rec.json_text())
        before = snapshot(root)
        started = time.monotonic()
        proc = run_cli("stop", run_id, cwd=root, timeout=60)
        elapsed = time.monotonic() - started
        one_error(proc, 77, f"belongs to {other}", run_id)
        assert elapsed < 10, elapsed
        assert snapshot(root) == before, "the refused stop wrote nothing"
        with pytest.raises(PermissionError):  # still alive, and still not ours to signal
            os.kill(pid, 0)
        proc = run_cli("status", "--json", cwd=root, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)[0]["state"] == "running"
    finally:
        _as_second(f"kill {pid} 2>/dev/null; true")


# --------------------------------------------------------------------------------------
# binds that lead to credentials or above $HOME
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("src", ["~/.ssh", "~/.ssh/id_rsa", "~/.gnupg", "~/.aws", "~/.config/gcloud", "~/.config",
                                 "~/.kube", "~/.docker", "HOME_PARENT", "LINK_TO_SSH"])
@pytest.mark.parametrize("command", [["run"], ["submit", "--dry-run"]])
def test_credential_and_home_parent_binds_are_refused(tmp_path: Path, command: list[str], src: str) -> None:
    home = tmp_path / "home" / "me"
    for rel in (".ssh", ".gnupg", ".aws", ".config/gcloud", ".kube", ".docker"):
        (home / rel).mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("KEY\n")
    root = tmp_path / "work" / "proj"
    (root / "experiments" / "hello").mkdir(parents=True)
    (root / "experiments" / "hello" / "Dockerfile").write_text("FROM busybox:latest\n")
    (tmp_path / "work" / "sshlink").symlink_to(home / ".ssh")
    value = {"HOME_PARENT": str(home.parent), "LINK_TO_SSH": str(tmp_path / "work" / "sshlink")}.get(src, src)
    (root / "hpcexp.yaml").write_text(f"experiments:\n  hello:\n    binds: [{{src: {json.dumps(value)}, dst: /x}}]\n")
    before = snapshot(tmp_path)
    proc = run_cli(*command, "hello", cwd=root, env={"HOME": str(home), "XDG_CACHE_HOME": str(tmp_path / "c")},
                   timeout=60)
    one_error(proc, 2, "refusing to bind", "--allow-bind")
    # hpcexp.yaml's parse may be kept in the user's cache (hpcexp.infra.yamlload); nothing else
    after = {k: v for k, v in snapshot(tmp_path).items()
             if k not in ("c", "c/hpcexp", "c/hpcexp/parsed") and not k.startswith("c/hpcexp/parsed/")}
    assert after == before, "refused before any build or run folder"


def test_allow_bind_lets_a_credential_folder_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hpcexp.core.config import load_project
    from hpcexp.errors import UsageError
    from hpcexp.runtime import launch

    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    root = tmp_path / "proj"
    (root / "experiments" / "hello").mkdir(parents=True)
    (root / "experiments" / "hello" / "Dockerfile").write_text("FROM busybox:latest\n")
    (root / "hpcexp.yaml").write_text("experiments:\n  hello:\n    binds: [{src: ~/.ssh, dst: /x}]\n")
    project = load_project(explicit=str(root))
    with pytest.raises(UsageError, match="credential folder ~/.ssh"):
        launch.check_binds(project, project.experiment("hello"))
    launch.check_binds(project, project.experiment("hello"), allow_binds=True)
    data = tmp_path / "data"
    data.mkdir()
    assert launch.canonical_bind_source(str(data), project) == str(data.resolve())


@pytest.mark.e2e
def test_stop_of_another_users_finished_run_writes_nothing(shared_project: tuple[Path, str]) -> None:
    """No process left (the owner's supervisor is gone): still not ours to touch."""
    root, other = shared_project
    run_id = "20260101-000000.000-0e0e0e"
    rec = runs.RunRecord(experiment="hello", run_id=run_id, state="running", user=other,
                         executor_ids={"supervisor_pid": 999_999, "supervisor_start": 1,
                                       "host": hostinfo.hostname(), "boot_id": hostinfo.boot_id()})
    run_dir = root / "runs" / "hello" / run_id
    _as_second(f"umask 007; mkdir {run_dir} && cat > {run_dir}/run.json", input=rec.json_text())
    before = snapshot(root)
    proc = run_cli("stop", run_id, cwd=root, timeout=60)
    one_error(proc, 77, f"belongs to {other}")
    assert snapshot(root) == before
